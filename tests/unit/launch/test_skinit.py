"""The `skinit` method (relaunchd.launch.skinit): readiness is judged (SVM, SKINIT, VM_CR,
the IOMMU, a TIS TPM, the Secure Kernel Loader), but no launch can be built yet — the
Secure Launch v16 kernel is Intel-only (dl-handler.md "AMD") — and it says so."""

from __future__ import annotations

import os
import struct

import pytest

from fixtures.platforms.build import materialize
from relaunchd.errors import NotReady
from relaunchd.launch.protocol import LaunchRequest
from relaunchd.launch.skinit import SkinitMethod
from relaunchd.platform import readiness
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot

MSR_VM_CR = 0xC0010114        # AMD APM vol. 2 §15.30.1: bit 4 SVMDIS


def verdict(root):
    return SkinitMethod().verdict(readiness.read_facts(ProbeConfig(root=str(root))))


def test_the_epyc_fixture_is_ready(tmp_path):
    """Every hardware check passes; the one refusal is the kernel side (no Secure Launch
    kernel accepts an SKINIT launch: v16 is Intel TXT only)."""
    v = verdict(materialize("amd-epyc-skinit", tmp_path))
    assert v.method == "skinit" and not v.ready
    assert [c.id for c in v.reasons] == ["skinit-no-kernel-support"]
    assert {"cpu-vendor", "svm-enabled", "skl", "iommu-active", "tpm-tis"} <= {
        c.id for c in v.checks if c.ok}


def test_svm_disabled_by_firmware(tmp_path):
    root = materialize("amd-epyc-skinit", tmp_path)
    fd = os.open(root / "dev/cpu/0/msr", os.O_WRONLY | os.O_CREAT)
    try:
        os.pwrite(fd, struct.pack("<Q", 1 << 4), MSR_VM_CR)
    finally:
        os.close(fd)
    assert "svm-disabled" in {c.id for c in verdict(root).reasons}


def test_no_secure_kernel_loader(tmp_path):
    root = materialize("amd-epyc-skinit", tmp_path)
    os.remove(root / "usr/lib/relaunchd/skl.bin")
    assert [c.id for c in verdict(root).reasons] == ["skinit-no-kernel-support", "skl-missing"]


@pytest.mark.parametrize(("fixture", "message"), [
    ("amd-epyc-skinit", r"not ready: .*Intel TXT only.*\[skinit-no-kernel-support\]"),
    ("intel-txt-server", r"not ready: .*\[cpu-not-amd\]"),
])
def test_no_launch_can_be_built(tmp_path, fixture, message):
    root = materialize(fixture, tmp_path)
    with pytest.raises(NotReady, match=message):
        SkinitMethod().segment_inputs(LaunchRequest(SysRoot(str(root)),
                                                    ProbeConfig(root=str(root))))
