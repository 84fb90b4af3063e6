"""The checks several launch methods share (relaunchd.launch.checks), on platform facts set
up one at a time: a verdict is ready only when every check is, an unreadable fact is
"unknown, not ready" and says why, and each reason id is the one docs/check.md lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relaunchd.launch import checks
from relaunchd.launch.checks import Check, Verdict
from relaunchd.platform.readiness import PlatformFacts
from relaunchd.platform.sysroot import Read, SysRoot

CHECK_MD = Path(__file__).resolve().parents[3] / "docs" / "check.md"
LAUNCH = Path(__file__).resolve().parents[3] / "daemon" / "relaunchd" / "launch"


def facts(tmp_path, **kw) -> PlatformFacts:
    reads = kw.pop("reads", {})
    ctx = PlatformFacts(SysRoot(str(tmp_path)), **kw)
    for name, read in reads.items():
        ctx.add(name, read)
    return ctx


def ok(value) -> Read:
    return Read("/fact", value)


def missing(error: str = "permission") -> Read:
    return Read("/fact", error=error, detail="EACCES")


def ids(found) -> list[str]:
    return [c.id for c in ([found] if isinstance(found, Check) else found)]


# ------------------------------------------------------------------ verdicts

def test_a_verdict_is_ready_only_when_every_check_is():
    yes, no, unknown = Check("a", True, "m"), Check("b", False, "m"), Check("c", None, "m")
    assert Verdict("kexec", (yes,)).ready
    assert not Verdict("kexec", (yes, no)).ready
    assert not Verdict("kexec", (yes, unknown)).ready       # unknown is not ready
    assert not Verdict("kexec", ()).ready                   # nothing checked: not ready
    verdict = Verdict("txt", (yes, no, unknown))
    assert verdict.reasons == [no, unknown]
    assert verdict.summary() == "m [b]; m [c]"


def test_a_reason_for_the_api():
    assert Check("x-id", False, "what", "fix").as_reason() == {
        "id": "x-id", "message": "what", "remedy": "fix"}


def test_every_reason_id_in_the_code_is_documented():
    """Each id a failing or unknown check can carry is in docs/check.md's table (an id
    built from a value, `tpm-{iface}`, needs at least one documented expansion)."""
    documented = set(re.findall(r"`([a-z0-9.-]+)`", CHECK_MD.read_text()))
    used = set()
    for module in LAUNCH.glob("*.py"):
        used |= set(re.findall(r'Check\(\s*f?"([a-z0-9{}_.-]+)",\s*(?:False|None)',
                               module.read_text()))
    assert len(used) > 30, "the scan found too few reason ids"
    undocumented = {
        reason for reason in used
        if not any(re.fullmatch(re.sub(r"\\\{\w+\\\}", "[a-z0-9.]+", re.escape(reason)), d)
                   for d in documented)}
    assert undocumented == set()


# ------------------------------------------------------------------ shared checks

@pytest.mark.parametrize(("kw", "expected", "ok_"), [
    ({"arch": "arm"}, "arch-unsupported", False),
    ({"arch": None}, "cpu-unknown", None),
    ({"arch": "x86", "vendor": "AuthenticAMD"}, "cpu-not-intel", False),
    ({"arch": "x86", "vendor": "GenuineIntel"}, "cpu-vendor", True),
])
def test_arch(tmp_path, kw, expected, ok_):
    ctx = facts(tmp_path, reads={"cpu.arch": missing("not-present")}, **kw)
    [check] = checks.arch_checks(ctx, "GenuineIntel", "Intel TXT")
    assert (check.id, check.ok) == (expected, ok_)
    if ok_ is None:
        assert "not-present" in check.message           # says why it is unknown


@pytest.mark.parametrize(("support", "syscall", "expected", "ok_"), [
    ({}, "kexec_file_load", "kexec-unsupported", False),
    ({"kexec_core": True, "kexec_file_load": None}, "kexec_file_load",
     "kexec-support-unknown", None),
    ({"kexec_core": True, "kexec_file_load": False}, "kexec_file_load",
     "kexec-file-unsupported", False),
    ({"kexec_core": True, "kexec_load": False}, "kexec_load", "kexec-load-unsupported", False),
    ({"kexec_core": True, "kexec_load": True}, "kexec_load", "kexec-supported", True),
])
def test_kexec_support(tmp_path, support, syscall, expected, ok_):
    ctx = facts(tmp_path, reads={"kexec.support": ok(support),
                                 "kernel.config": missing("not-present")})
    check = checks.kexec_support_check(ctx, syscall)
    assert (check.id, check.ok) == (expected, ok_)


@pytest.mark.parametrize(("read", "expected"), [
    (None, []), (ok(False), ["kexec-enabled"]), (ok(True), ["kexec-disabled"]),
    (missing(), ["kexec-disabled-unknown"]),
])
def test_kexec_enabled(tmp_path, read, expected):
    ctx = facts(tmp_path, reads={"kexec.load_disabled": read} if read else {})
    found = checks.kexec_enabled_check(ctx)
    assert (ids(found) if found else []) == expected


@pytest.mark.parametrize(("present", "version", "iface", "need", "expected"), [
    (missing(), None, None, None, ["tpm-unknown"]),
    (ok(False), None, None, None, ["tpm-missing"]),
    (ok(True), ok(1), None, None, ["tpm-1.2"]),
    (ok(True), missing(), None, None, ["tpm-version-unknown"]),
    (ok(True), ok(2), None, None, ["tpm-2.0"]),
    (ok(True), ok(2), ok("crb"), "SL needs TIS", ["tpm-2.0", "tpm-crb"]),
    (ok(True), ok(2), ok("tis"), "SL needs TIS", ["tpm-2.0", "tpm-tis"]),
    (ok(True), ok(2), missing(), "SL needs TIS", ["tpm-2.0", "tpm-interface-unknown"]),
])
def test_tpm(tmp_path, present, version, iface, need, expected):
    reads = {"tpm.present": present, "tpm.driver": ok("tpm_crb")}
    if version is not None:
        reads["tpm.version"] = version
    if iface is not None:
        reads["tpm.interface"] = iface
    found = checks.tpm_checks(facts(tmp_path, reads=reads), need)
    assert ids(found) == expected
    assert all(c.ok is True for c in found) == (expected in (["tpm-2.0"],
                                                             ["tpm-2.0", "tpm-tis"]))


@pytest.mark.parametrize(("table", "cmdline", "units", "expected"), [
    (False, {"disabled": [], "passthrough": []}, [], ["iommu-table-missing"]),
    (True, {"disabled": ["intel_iommu=off"], "passthrough": []}, ["dmar0"],
     ["iommu-table", "iommu-disabled"]),
    (True, {"disabled": [], "passthrough": ["iommu=pt"]}, ["dmar0"],
     ["iommu-table", "iommu-passthrough"]),
    (True, {"disabled": [], "passthrough": []}, [], ["iommu-table", "iommu-inactive"]),
    (True, {"disabled": [], "passthrough": []}, ["dmar0"], ["iommu-table", "iommu-active"]),
    (True, None, ["dmar0"], ["iommu-table", "iommu-cmdline-unknown"]),
])
def test_iommu(tmp_path, table, cmdline, units, expected):
    reads = {"iommu.dmar": ok(table), "iommu.units": ok(units),
             "iommu.cmdline": ok(cmdline) if cmdline is not None else missing(),
             "kernel.cmdline": missing()}
    found = checks.iommu_checks(facts(tmp_path, reads=reads), "DMAR")
    assert ids(found) == expected


@pytest.mark.parametrize(("lockdown", "reboot_cpu", "expected"), [
    ("none", ok(0), ["kexec-supported", "kexec-enabled", "lockdown-none", "reboot-cpu"]),
    ("integrity", ok(0), ["kexec-supported", "kexec-enabled", "lockdown-kexec-load",
                          "reboot-cpu"]),
    (None, ok(0), ["kexec-supported", "kexec-enabled", "lockdown-unknown", "reboot-cpu"]),
    ("none", ok(2), ["kexec-supported", "kexec-enabled", "lockdown-none", "reboot-cpu-not-0"]),
])
def test_what_every_drtm_relaunch_needs(tmp_path, lockdown, reboot_cpu, expected):
    reads = {"kexec.support": ok({"kexec_core": True, "kexec_load": True}),
             "kexec.load_disabled": ok(False), "cpus.reboot_cpu": reboot_cpu,
             "kernel.lockdown": missing()}
    found = checks.drtm_common(facts(tmp_path, lockdown=lockdown, reads=reads))
    assert ids(found) == expected
