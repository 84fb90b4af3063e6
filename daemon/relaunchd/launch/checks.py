"""Readiness verdicts: the checks a launch method makes of the platform facts (launch layer).

Each verdict is a list of checks; a check whose fact could not be read fails ("unknown is
not ready") and says why. Reason ids are stable: they are the API for update tools and are
listed in docs/check.md. The checks here are the ones several methods share; each method
module (`kexec`, `txt`, `skinit`) adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaunchd.platform.readiness import PlatformFacts


@dataclass(frozen=True)
class Check:
    """One requirement of one method: ok, failed (False) or unknown (None)."""

    id: str
    ok: bool | None
    message: str
    remedy: str = ""

    def as_reason(self) -> dict[str, str]:
        return {"id": self.id, "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True)
class Verdict:
    method: str
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return bool(self.checks) and all(c.ok is True for c in self.checks)

    @property
    def reasons(self) -> list[Check]:
        return [c for c in self.checks if c.ok is not True]

    def summary(self) -> str:
        """The reasons as one line: "message [id]; …"."""
        return "; ".join(f"{c.message} [{c.id}]" for c in self.reasons)


def arch_checks(ctx: PlatformFacts, vendor: str, what: str) -> list[Check]:
    if ctx.arch == "arm":
        return [Check("arch-unsupported", False,
                      "Arm: Linux has no DRTM interface (TF-A's DRTM service has no kernel "
                      "driver or sysfs ABI)", "use the kexec method")]
    if ctx.arch is None:
        return [Check("cpu-unknown", None, f"CPU unknown: {ctx.why('cpu.arch')}",
                      "make /proc/cpuinfo readable")]
    if ctx.vendor != vendor:
        return [Check(f"cpu-not-{'intel' if vendor == 'GenuineIntel' else 'amd'}", False,
                      f"CPU vendor is {ctx.vendor}; {what} needs {vendor}",
                      "use a launch method of this CPU vendor")]
    return [Check("cpu-vendor", True, f"CPU vendor {vendor}")]


def kexec_support_check(ctx: PlatformFacts, syscall: str) -> Check:
    support = ctx.value("kexec.support") or {}
    fail_id = "kexec-file-unsupported" if syscall == "kexec_file_load" \
        else "kexec-load-unsupported"
    opt = "CONFIG_KEXEC_FILE" if syscall == "kexec_file_load" else "CONFIG_KEXEC"
    if not support.get("kexec_core", False) and not any(support.get(k) for k in support):
        return Check("kexec-unsupported", False,
                     "the running kernel has no kexec support (no /sys/kernel/kexec_loaded, "
                     "CONFIG_KEXEC and CONFIG_KEXEC_FILE not set)",
                     f"boot a kernel built with {opt}=y")
    if support.get(syscall) is None:
        return Check("kexec-support-unknown", None,
                     f"cannot tell whether {syscall} exists: {ctx.why('kernel.config')}",
                     "install /boot/config-$(uname -r) or enable CONFIG_IKCONFIG_PROC")
    if not support[syscall]:
        return Check(fail_id, False, f"the running kernel lacks {syscall} ({opt} is not set)",
                     f"boot a kernel built with {opt}=y")
    return Check("kexec-supported", True, f"{syscall} available")


def kexec_enabled_check(ctx: PlatformFacts) -> Check | None:
    if "kexec.load_disabled" not in ctx.facts:
        return None
    disabled = ctx.value("kexec.load_disabled")
    if disabled is None:
        return Check("kexec-disabled-unknown", None,
                     f"kexec_load_disabled unreadable: {ctx.why('kexec.load_disabled')}",
                     "run the check as root")
    if disabled:
        return Check("kexec-disabled", False, "kexec is disabled by sysctl "
                     "kernel.kexec_load_disabled=1 (one-way until reboot)",
                     "remove kernel.kexec_load_disabled from /etc/sysctl.d and reboot")
    return Check("kexec-enabled", True, "kexec not disabled by sysctl")


def lockdown_known(ctx: PlatformFacts) -> Check | None:
    if ctx.lockdown is None:
        return Check("lockdown-unknown", None,
                     f"kernel lockdown state unknown: {ctx.why('kernel.lockdown')}",
                     "mount securityfs on /sys/kernel/security")
    return None


def tpm_checks(ctx: PlatformFacts, need_tis: str | None) -> list[Check]:
    present = ctx.value("tpm.present")
    if present is None:
        return [Check("tpm-unknown", None, f"TPM state unknown: {ctx.why('tpm.present')}",
                      "make /sys/class/tpm readable")]
    if not present:
        return [Check("tpm-missing", False, "no TPM (nothing in /sys/class/tpm)",
                      "enable the TPM (or fTPM/PTT) in firmware and load its driver")]
    out: list[Check] = []
    version = ctx.value("tpm.version")
    if version is None:
        out.append(Check("tpm-version-unknown", None,
                         f"TPM version unknown: {ctx.why('tpm.version')}",
                         "use a kernel that exposes tpm_version_major"))
    elif version != 2:
        out.append(Check("tpm-1.2", False, "TPM 1.2: relaunchd measures and verifies "
                         "with TPM 2.0 only", "switch the TPM to 2.0 mode in firmware"))
    else:
        out.append(Check("tpm-2.0", True, "TPM 2.0 present"))
    if need_tis:
        iface = ctx.value("tpm.interface")
        if iface is None:
            out.append(Check("tpm-interface-unknown", None,
                             f"TPM interface unknown: {ctx.why('tpm.interface')}",
                             "check /sys/class/tpm/tpm0/device/driver"))
        elif iface != "tis":
            out.append(Check(f"tpm-{iface}", False,
                             f"TPM uses the {ctx.value('tpm.driver')} interface; {need_tis}",
                             "use a discrete TPM on the TIS/FIFO interface (firmware setting)"))
        else:
            out.append(Check("tpm-tis", True, "TPM on the TIS/FIFO interface"))
    return out


def iommu_checks(ctx: PlatformFacts, table: str) -> list[Check]:
    name = {"DMAR": "VT-d", "IVRS": "AMD-Vi"}[table]
    enable = {"DMAR": "intel_iommu=on", "IVRS": "amd_iommu=on"}[table]
    out = []
    has_table = bool(ctx.value(f"iommu.{table.lower()}"))
    if not has_table:
        out.append(Check("iommu-table-missing", False,
                         f"no {table} ACPI table: {name} is off or absent in firmware",
                         f"enable {name} in firmware setup"))
    else:
        out.append(Check("iommu-table", True, f"{table} ACPI table present"))
    switches = ctx.value("iommu.cmdline")
    if switches is None:
        out.append(Check("iommu-cmdline-unknown", None,
                         f"kernel command line unreadable: {ctx.why('kernel.cmdline')}",
                         "make /proc/cmdline readable"))
    elif switches["disabled"]:
        out.append(Check("iommu-disabled", False, "the IOMMU is disabled on the command line "
                         f"({' '.join(switches['disabled'])})",
                         "remove the option from the kernel command line"))
    elif switches["passthrough"]:
        out.append(Check("iommu-passthrough", False, "the IOMMU is in passthrough mode "
                         f"({' '.join(switches['passthrough'])}); Secure Launch forbids it",
                         "remove the option; prefer iommu.strict=1"))
    elif not has_table:
        pass   # the missing table is the reason; an inactive IOMMU follows from it
    elif not ctx.value("iommu.units"):
        out.append(Check("iommu-inactive", False, "no IOMMU active (/sys/class/iommu is empty)",
                         f"build the kernel with {name} support and boot with {enable}"))
    else:
        out.append(Check("iommu-active", True,
                         f"IOMMU active ({', '.join(ctx.value('iommu.units'))})"))
    return out


def drtm_common(ctx: PlatformFacts) -> list[Check]:
    """What any DRTM relaunch needs from the running kernel (drtm.md §2.6, §5)."""
    out = [kexec_support_check(ctx, "kexec_load")]
    if (c := kexec_enabled_check(ctx)) is not None:
        out.append(c)
    if (c := lockdown_known(ctx)) is not None:
        out.append(c)
    elif ctx.lockdown != "none":
        out.append(Check("lockdown-kexec-load", False,
                         f"kernel lockdown ({ctx.lockdown}) refuses kexec_load, which a DRTM "
                         "relaunch needs for its extra segments",
                         "boot without lockdown (lockdown=none; needs Secure Boot off or "
                         "a kernel without forced lockdown)"))
    else:
        out.append(Check("lockdown-none", True, "no kernel lockdown"))
    reboot = ctx.facts.get("cpus.reboot_cpu")
    if reboot is not None and reboot.ok and reboot.value != 0:
        out.append(Check("reboot-cpu-not-0", False,
                         f"kexec runs on CPU {reboot.value}; the launch must run on the BSP",
                         "echo 0 > /sys/kernel/reboot/cpu (or drop reboot=s<N>)"))
    else:
        out.append(Check("reboot-cpu", True, "kexec runs on CPU 0 (the BSP)"))
    return out
