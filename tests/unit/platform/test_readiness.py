"""The platform facts the readiness probe reads (relaunchd.platform.readiness) from the
platform fixtures (tests/fixtures/platforms/): values, sources, and what it must not open."""

from __future__ import annotations

import os

import pytest

from fixtures.platforms.build import materialize
from relaunchd.platform import readiness
from relaunchd.platform.sysroot import SysRoot


def test_server_facts(tmp_path):
    root = str(materialize("intel-txt-server", tmp_path))
    f = readiness.read_facts(readiness.ProbeConfig(root=root)).facts
    assert f["txt.acm_match"].value == "/boot/SPR_SINIT_v1.2.BIN"
    acms = {a["path"]: a for a in f["txt.acms"].value}
    assert acms["/boot/ADL_SINIT_v1.0.BIN"]["chipset_match"] is False
    assert f["txt.registers"].path == "/dev/mem"
    assert f["txt.registers"].value["chipset"]["device_id"] == "0xb005"
    assert f["txt.dlme"].value is False
    assert f["cpu.feature_control"].value["senter_global"] is True
    assert (f["tpm.version"].value, f["tpm.interface"].value) == (2, "tis")
    assert f["tpm.banks"].value == ["sha1", "sha256"]
    assert f["iommu.units"].value == ["dmar0", "dmar1"]
    assert f["kernel.lockdown"].value == "none"
    assert f["cpus.offlinable"].value == [1, 2, 3]
    assert f["boot.firmware"].value == "uefi" and f["boot.secure_boot"].value is False


def _recording(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = SysRoot._open

    def spy(self, path, allow_chardev=False):
        opened.append(path)
        return real(self, path, allow_chardev)

    monkeypatch.setattr(SysRoot, "_open", spy)
    return opened


def test_lockdown_does_not_touch_devmem(tmp_path, monkeypatch):
    root = materialize("secureboot-lockdown", tmp_path)
    assert os.path.exists(root / "dev/mem")      # there, but lockdown means the kernel refuses
    opened = _recording(monkeypatch)
    facts = readiness.read_facts(readiness.ProbeConfig(root=str(root))).facts
    assert "/dev/mem" not in opened
    assert facts["txt.registers"].error == "permission"
    assert facts["boot.secure_boot"].value is True


@pytest.mark.parametrize("name", ["vm-no-tpm", "amd-epyc-skinit"])
def test_no_smx_no_devmem_no_feature_control(name, tmp_path, monkeypatch):
    root = materialize(name, tmp_path)
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev/mem").write_bytes(b"")
    opened = _recording(monkeypatch)
    readiness.read_facts(readiness.ProbeConfig(root=str(root)))
    assert "/dev/mem" not in opened
    # AMD reads VM_CR (it has svm); nobody without SMX reads IA32_FEATURE_CONTROL.
    assert name == "amd-epyc-skinit" or "/dev/cpu/0/msr" not in opened
