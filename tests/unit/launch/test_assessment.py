"""The readiness report (relaunchd.launch.assessment): every launch method's verdict, reason ids
and the best method for each platform fixture (tests/fixtures/platforms/)."""

from __future__ import annotations

import os

import pytest

from fixtures.platforms.build import materialize, names
from relaunchd.launch import assessment
from relaunchd.platform import readiness

# fixture -> method -> (ready, exact set of reason ids)
EXPECTED = {
    "intel-txt-server": {
        "txt": (True, set()),
        "skinit": (False, {"cpu-not-amd"}),
        "kexec": (True, set()),
    },
    "intel-laptop-ptt": {
        "txt": (False, {"tpm-crb", "sinit-acm-missing"}),
        "skinit": (False, {"cpu-not-amd"}),
        "kexec": (True, set()),
    },
    "amd-epyc-skinit": {
        "txt": (False, {"cpu-not-intel"}),
        # Everything SKINIT needs is there, but no Secure Launch kernel accepts it.
        "skinit": (False, {"skinit-no-kernel-support"}),
        "kexec": (True, set()),
    },
    "vm-no-tpm": {
        "txt": (False, {"cpu-no-smx", "tpm-missing"}),
        "skinit": (False, {"cpu-not-amd", "tpm-missing"}),
        "kexec": (False, {"tpm-missing"}),
    },
    "secureboot-lockdown": {
        "txt": (False, {"txt-regs-unreadable", "sinit-acm-unverified", "lockdown-kexec-load"}),
        "skinit": (False, {"cpu-not-amd", "lockdown-kexec-load"}),
        "kexec": (True, set()),
    },
    "txt-error": {
        "txt": (False, {"txt-reset-sticky", "txt-error"}),
        "skinit": (False, {"cpu-not-amd"}),
        "kexec": (True, set()),
    },
}
BEST = {"intel-txt-server": "txt", "intel-laptop-ptt": "kexec", "amd-epyc-skinit": "kexec",
        "vm-no-tpm": None, "secureboot-lockdown": "kexec", "txt-error": "kexec"}


def test_every_fixture_has_expectations():
    assert set(names()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verdicts_and_reasons(name, tmp_path):
    report = assessment.assess(readiness.ProbeConfig(root=str(materialize(name, tmp_path))))
    for method, (ready, reasons) in EXPECTED[name].items():
        v = report.verdicts[method]
        assert (v.ready, {c.id for c in v.reasons}) == (ready, reasons), method
        for c in v.reasons:
            assert c.message and c.remedy, c
    assert report.best == BEST[name]
    for fact in report.facts.values():
        assert fact.path.startswith("/") or fact.path.startswith("tcti:")


def test_txt_error_is_decoded(tmp_path):
    report = assessment.assess(readiness.ProbeConfig(root=str(materialize("txt-error", tmp_path))))
    err = next(c for c in report.verdicts["txt"].reasons if c.id == "txt-error")
    assert "0xc0008011" in err.message and "HEAP_INVALID_DMAR" in err.message
    assert "power" in next(c for c in report.verdicts["txt"].reasons
                           if c.id == "txt-reset-sticky").remedy


def test_unreadable_facts_are_unknown_not_ready(tmp_path):
    root = materialize("intel-txt-server", tmp_path)
    os.remove(root / "dev/cpu/0/msr")           # msr module not loaded
    (root / "proc/sys/kernel/kexec_load_disabled").write_text("maybe\n")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    txt = report.verdicts["txt"]
    assert not txt.ready
    unknown = {c.id for c in txt.checks if c.ok is None}
    assert unknown == {"feature-control-unreadable", "kexec-disabled-unknown"}
    assert report.facts["cpu.feature_control"].error == "not-present"
    assert report.facts["kexec.load_disabled"].error == "garbage"


def test_variations(tmp_path):
    root = materialize("intel-txt-server", tmp_path)
    (root / "proc/cmdline").write_text("root=/dev/sda1 iommu=pt quiet\n")
    (root / "proc/sys/kernel/kexec_load_disabled").write_text("1\n")
    (root / "sys/kernel/reboot/cpu").write_text("2\n")
    os.remove(root / "usr/lib/relaunchd/txt-dl-handler.bin")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    assert {c.id for c in report.verdicts["txt"].reasons} == {
        "iommu-passthrough", "kexec-disabled", "reboot-cpu-not-0", "dl-handler-missing"}
    assert {c.id for c in report.verdicts["kexec"].reasons} == {"kexec-disabled"}


def test_acm_mismatch_and_fuse(tmp_path):
    root = materialize("intel-txt-server", tmp_path)
    os.remove(root / "boot/SPR_SINIT_v1.2.BIN")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    [reason] = [c for c in report.verdicts["txt"].reasons]
    assert reason.id == "sinit-acm-mismatch" and "8086:b005" in reason.message
    from fixtures.platforms.build import build_acm
    (root / "boot/dbg_sinit.bin").write_bytes(build_acm(did=0xB005, rid=1, debug=1))
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    assert [c.id for c in report.verdicts["txt"].reasons] == ["sinit-acm-fuse-mismatch"]
    (root / "boot/broken_SINIT.BIN").write_bytes(b"not an acm")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    broken = next(a for a in report.facts["txt.acms"].value if "broken" in a["path"])
    assert broken["error"].startswith("InvalidAcm")


def test_kexec_without_file_load_and_lockdown_without_sig(tmp_path):
    root = materialize("vm-no-tpm", tmp_path)
    cfg = root / "boot/config-6.1.0-28-cloud-amd64"
    cfg.write_text(cfg.read_text().replace("CONFIG_KEXEC_FILE=y", "# CONFIG_KEXEC_FILE is not set")
                   .replace("CONFIG_KEXEC_SIG=y", "# CONFIG_KEXEC_SIG is not set"))
    (root / "sys/kernel/security/lockdown").write_text("none [integrity] confidentiality\n")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    assert {c.id for c in report.verdicts["kexec"].reasons} == {
        "kexec-file-unsupported", "lockdown-unsigned-kexec", "tpm-missing"}


def test_no_kernel_config_no_kexec(tmp_path):
    root = materialize("vm-no-tpm", tmp_path)
    os.remove(root / "boot/config-6.1.0-28-cloud-amd64")
    os.remove(root / "sys/kernel/kexec_loaded")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    assert "kexec-unsupported" in {c.id for c in report.verdicts["kexec"].reasons}
    assert report.facts["kernel.config"].error == "not-present"


def test_arm_and_empty_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n")
    report = assessment.assess(readiness.ProbeConfig(root=str(tmp_path)))
    for m in ("txt", "skinit"):
        assert "arch-unsupported" in {c.id for c in report.verdicts[m].reasons}
    empty = tmp_path / "empty"
    empty.mkdir()
    report = assessment.assess(readiness.ProbeConfig(root=str(empty)))
    assert report.best is None
    assert "cpu-unknown" in {c.id for c in report.verdicts["txt"].reasons}
    assert report.facts["cpu.vendor"].error == "not-present"


def test_dl_handler_is_validated_not_just_present(tmp_path):
    """The shipped handler (build/dl-handler, installed into the fixture root as the
    package installs it) satisfies `dl-handler`; anything else at that path is
    `dl-handler-invalid`, nothing at all `dl-handler-missing`."""
    root = materialize("intel-txt-server", tmp_path)
    handler = root / "usr/lib/relaunchd/txt-dl-handler.bin"
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    check = next(c for c in report.verdicts["txt"].checks if c.id.startswith("dl-handler"))
    assert (check.id, check.ok) == ("dl-handler", True)
    assert report.facts["launch.dl_handler"].value["slrt_layout"] == 16
    handler.write_bytes(b"placeholder DL handler (existence is checked)\n")
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    assert {c.id for c in report.verdicts["txt"].reasons} == {"dl-handler-invalid"}
    handler.unlink()
    report = assessment.assess(readiness.ProbeConfig(root=str(root)))
    reason = report.verdicts["txt"].reasons[0]
    assert reason.id == "dl-handler-missing" and "relaunchd package" in reason.remedy


def test_skinit_refusal_names_the_kernel_side(tmp_path):
    report = assessment.assess(readiness.ProbeConfig(
        root=str(materialize("amd-epyc-skinit", tmp_path))))
    reason = report.verdicts["skinit"].reasons[0]
    assert "Intel TXT only" in reason.message and "kexec" in reason.remedy
