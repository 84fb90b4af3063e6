"""The `kexec` method (relaunchd.launch.kexec): its verdict — kexec_file_load present and
enabled, what lockdown allows (Documentation/admin-guide/LSM/lockdown: integrity mode
refuses unsigned kexec_file_load), a TPM 2.0 — and its segment-loader inputs (a hand-off
rehearsal: no DCE, no DL handler)."""

from __future__ import annotations

import pytest

from fixtures.platforms.build import materialize
from relaunchd.launch.kexec import KexecMethod
from relaunchd.launch.segment_loader import SegmentInputs
from relaunchd.platform import readiness
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.readiness import PlatformFacts
from relaunchd.platform.sysroot import Read, SysRoot


def ctx(tmp_path, *, lockdown: str | None, sig: dict) -> PlatformFacts:
    facts = PlatformFacts(SysRoot(str(tmp_path)), lockdown=lockdown)
    facts.add("kexec.support", Read("/s", {"kexec_core": True, "kexec_file_load": True}))
    facts.add("kexec.load_disabled", Read("/p", False))
    facts.add("kexec.sig", Read("/boot/config", sig))
    facts.add("kernel.lockdown", Read("/sys/kernel/security/lockdown", error="not-present"))
    facts.add("tpm.present", Read("/sys/class/tpm", True))
    facts.add("tpm.version", Read("/sys/class/tpm/tpm0/tpm_version_major", 2))
    return facts


@pytest.mark.parametrize(("lockdown", "sig", "expected", "ready"), [
    ("none", {}, "lockdown-none", True),
    ("none", {"KEXEC_SIG": True, "KEXEC_SIG_FORCE": True}, "kexec-signed-only", True),
    ("integrity", {"KEXEC_SIG": True}, "kexec-signed-only", True),
    ("integrity", {}, "lockdown-unsigned-kexec", False),
    ("confidentiality", {}, "lockdown-unsigned-kexec", False),
    (None, {"KEXEC_SIG": True}, "lockdown-unknown", False),
])
def test_what_lockdown_allows(tmp_path, lockdown, sig, expected, ready):
    verdict = KexecMethod().verdict(ctx(tmp_path, lockdown=lockdown, sig=sig))
    assert [c.id for c in verdict.checks] == ["kexec-supported", "kexec-enabled", expected,
                                              "tpm-2.0"]
    assert verdict.method == "kexec" and verdict.ready is ready


@pytest.mark.parametrize(("fixture", "ready"), [
    ("intel-laptop-ptt", True), ("secureboot-lockdown", True), ("vm-no-tpm", False)])
def test_on_the_platform_fixtures(tmp_path, fixture, ready):
    root = materialize(fixture, tmp_path)
    verdict = KexecMethod().verdict(readiness.read_facts(ProbeConfig(root=str(root))))
    assert verdict.ready is ready
    if fixture == "secureboot-lockdown":      # Secure Boot: signed kernels only
        assert "kexec-signed-only" in [c.id for c in verdict.checks]


def test_its_segment_loader_inputs_are_a_rehearsal(tmp_path):
    from relaunchd.launch.protocol import LaunchRequest

    inputs = KexecMethod().segment_inputs(LaunchRequest(SysRoot(str(tmp_path)),
                                                        ProbeConfig(root=str(tmp_path))))
    assert inputs == SegmentInputs()
    assert inputs.txt is None and inputs.intel_info is None
