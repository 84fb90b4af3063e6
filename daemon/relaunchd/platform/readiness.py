"""Platform readiness facts, each with its source (platform layer).

What `relaunchctl check` and the engine's `Capabilities` are built from: the CPU, the
kernel's configuration and lockdown, kexec support, CPUs, IOMMU, TPM, Intel TXT registers
and SINIT ACMs, AMD SVM. Each launch method turns these facts into its own verdict
(`launch.kexec`, `launch.txt`, `launch.skinit`).

Everything is read through one `SysRoot`. Dangerous-to-touch sources are
gated: /dev/mem and IA32_FEATURE_CONTROL are read only on Intel CPUs with SMX,
AMD's VM_CR only on CPUs with SVM (drtm.md §3.1, §3.2).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from relaunchd.formats import acm as acmfmt
from relaunchd.formats import txt_dl_handler
from relaunchd.platform import tpm as tpmfacts
from relaunchd.platform import txt_registers as txtregs
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.secure_boot import read_efi_bool, read_lockdown
from relaunchd.platform.sysroot import NOT_PRESENT, PERMISSION, Read, SysRoot

MSR_DEV = "/dev/cpu/0/msr"
MSR_FEATURE_CONTROL = 0x3A    # IA32_FEATURE_CONTROL (drtm.md §3.1)
MSR_VM_CR = 0xC0010114        # AMD VM_CR: bit3 LOCK, bit4 SVMDIS (AMD APM vol. 2, §15.30.1)
CONFIG_KEYS = ("KEXEC", "KEXEC_FILE", "KEXEC_SIG", "KEXEC_SIG_FORCE", "SECURE_LAUNCH",
               "SECURITY_LOCKDOWN_LSM", "LOCK_DOWN_KERNEL_FORCE_INTEGRITY",
               "LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY", "LOCK_DOWN_IN_EFI_SECURE_BOOT",
               "DEVMEM", "STRICT_DEVMEM", "IO_STRICT_DEVMEM", "X86_MSR", "TCG_TPM", "TCG_TIS",
               "TCG_CRB", "INTEL_IOMMU", "AMD_IOMMU", "HOTPLUG_CPU")
ACM_PATTERNS = ("*sinit*.bin", "*sinit*.acm")   # GRUB-AEM convention (drtm.md §3.6)
MAX_ACM_FILES = 32
CPUINFO_HEAD = 16 << 10      # the first processor block is all we need


@dataclass
class PlatformFacts:
    """The facts as read (`facts`, JSON-ready, with sources) and the typed values the
    launch methods' verdicts need."""

    root: SysRoot
    facts: dict[str, Read] = field(default_factory=dict)
    vendor: str | None = None
    arch: str | None = None
    flags: frozenset[str] = frozenset()
    fms: int | None = None
    config: dict[str, str] | None = None
    lockdown: str | None = None
    txt: txtregs.TxtRegisters | None = None

    def add(self, name: str, read: Read) -> Read:
        self.facts[name] = read
        return read

    def value(self, name: str) -> Any:
        r = self.facts.get(name)
        return r.value if r is not None and r.ok else None

    def why(self, name: str) -> str:
        r = self.facts.get(name)
        if r is None:
            return "not probed"
        return f"{r.path}: {r.error}" + (f" ({r.detail})" if r.detail else "")

    def cfg(self, key: str) -> str | None:
        """`y`/`m`/`n` for a kernel config option, None when the config is unknown."""
        if self.config is None:
            return None
        return self.config.get(key, "n")


def read_facts(config: ProbeConfig | None = None) -> PlatformFacts:
    config = config or ProbeConfig()
    ctx = PlatformFacts(SysRoot(config.root))
    _cpu(ctx)
    _kernel(ctx)
    _efi(ctx)
    _lockdown(ctx)
    _kexec(ctx)
    _cpus(ctx)
    _iommu(ctx)
    for name, read in tpmfacts.sysfs_facts(ctx.root).items():
        ctx.add(name, read)
    _tpm_pcrs(ctx, config)
    _intel(ctx, config)
    _amd(ctx, config)
    return ctx


# ---------------------------------------------------------------- facts

def _cpu(ctx: PlatformFacts) -> None:
    head = ctx.root.read_prefix("/proc/cpuinfo", CPUINFO_HEAD)
    if not head.ok or head.value is None:
        ctx.add("cpu.vendor", Read(head.path, error=head.error, detail=head.detail))
        return
    block = head.value.split("\n\n", 1)[0]
    info: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            info.setdefault(key.strip(), val.strip())
    src = head.path
    if "vendor_id" in info:
        ctx.arch = "x86"
    elif "CPU implementer" in info:
        ctx.arch = "arm"
    ctx.add("cpu.arch", Read(src, ctx.arch) if ctx.arch else
            Read(src, error="garbage", detail="neither vendor_id nor CPU implementer"))
    if ctx.arch != "x86":
        return
    ctx.vendor = info["vendor_id"]
    ctx.add("cpu.vendor", Read(src, ctx.vendor))
    ctx.flags = frozenset(info.get("flags", "").split())
    wanted = ("smx", "vmx", "svm", "skinit", "hypervisor")
    ctx.add("cpu.flags", Read(src, {f: f in ctx.flags for f in wanted}))
    try:
        family, model = int(info["cpu family"]), int(info["model"])
        stepping = int(info.get("stepping", "0"))
    except (KeyError, ValueError):
        ctx.add("cpu.model", Read(src, error="garbage", detail="no numeric family/model"))
        return
    ctx.fms = acmfmt.cpu_fms(family, model, stepping)
    ctx.add("cpu.model", Read(src, {"family": family, "model": model, "stepping": stepping,
                                    "fms": f"0x{ctx.fms:x}", "name": info.get("model name")}))


def _kernel(ctx: PlatformFacts) -> None:
    rel = ctx.add("kernel.release", ctx.root.read_line("/proc/sys/kernel/osrelease"))
    cmdline = ctx.add("kernel.cmdline", ctx.root.read_line("/proc/cmdline"))
    del cmdline
    sources: list[Read[str]] = []
    if rel.ok:
        sources.append(ctx.root.read_text(f"/boot/config-{rel.value}", limit=8 << 20))
    if not sources or not sources[0].ok:
        sources.append(ctx.root.read_gzip_text("/proc/config.gz"))
    text = sources[-1]
    if not text.ok or text.value is None:
        tried = ", ".join(f"{s.path}: {s.error}" for s in sources)
        ctx.add("kernel.config", Read(text.path, error=text.error, detail=f"tried {tried}"))
    else:
        ctx.config = _parse_kconfig(text.value)
        ctx.add("kernel.config", Read(text.path, {k: ctx.config.get(k, "n")
                                                   for k in CONFIG_KEYS}))
    securityfs = ctx.root.is_dir("/sys/kernel/security/slaunch")
    ctx.add("kernel.secure_launch", Read(
        "/sys/kernel/security/slaunch",
        {"config": ctx.cfg("SECURE_LAUNCH"), "securityfs": securityfs,
         # v16 is the only revision with the txt/ securityfs layout we know (drtm.md §2.1).
         "revision": "v16 layout" if securityfs and
         ctx.root.is_dir(txtregs.SECURITYFS_DIR) else "unknown"}))


_KCONFIG = re.compile(r"^(?:CONFIG_(\w+)=(\S+)|# CONFIG_(\w+) is not set)$", re.M)


def _parse_kconfig(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in _KCONFIG.finditer(text):
        if m.group(1):
            out[m.group(1)] = m.group(2).strip('"')
        else:
            out[m.group(3)] = "n"
    return out


def _efi(ctx: PlatformFacts) -> None:
    uefi = ctx.root.is_dir("/sys/firmware/efi")
    ctx.add("boot.firmware", Read("/sys/firmware/efi", "uefi" if uefi else "bios"))
    if not uefi:
        return
    for fact, var in (("boot.secure_boot", "SecureBoot"), ("boot.setup_mode", "SetupMode")):
        ctx.add(fact, read_efi_bool(ctx.root, var))


def _lockdown(ctx: PlatformFacts) -> None:
    line = read_lockdown(ctx.root)
    if (line.ok and line.value is not None) or line.error == "garbage":
        ctx.lockdown = line.value
        ctx.add("kernel.lockdown", line)
        return
    # securityfs not mounted (or no LSM): fall back to what the kernel config forces.
    src = ctx.facts["kernel.config"].path
    if ctx.cfg("SECURITY_LOCKDOWN_LSM") == "n":
        ctx.lockdown = "none"
    elif ctx.cfg("LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY") == "y":
        ctx.lockdown = "confidentiality"
    elif ctx.cfg("LOCK_DOWN_KERNEL_FORCE_INTEGRITY") == "y" or (
            ctx.cfg("LOCK_DOWN_IN_EFI_SECURE_BOOT") == "y" and ctx.value("boot.secure_boot")):
        ctx.lockdown = "integrity"
    if ctx.lockdown is None:
        ctx.add("kernel.lockdown", Read(line.path, error=line.error, detail=line.detail))
    else:
        ctx.add("kernel.lockdown", Read(src, ctx.lockdown,
                                        detail=f"{line.path} {line.error}; from kernel config"))


def _kexec(ctx: PlatformFacts) -> None:
    loaded = ctx.root.read_int("/sys/kernel/kexec_loaded")
    core = loaded.ok or ctx.root.exists("/sys/kernel/kexec_loaded")
    src = ctx.facts["kernel.config"].path
    support: dict[str, bool | None] = {
        "kexec_load": None if ctx.config is None else ctx.cfg("KEXEC") == "y",
        "kexec_file_load": None if ctx.config is None else ctx.cfg("KEXEC_FILE") == "y",
        "kexec_core": core,
    }
    if ctx.config is None and not core:
        support = {k: False for k in support}   # no kexec_loaded attribute: no kexec core
        src = loaded.path
    ctx.add("kexec.support", Read(src, support))
    ctx.add("kexec.sig", Read(src, None if ctx.config is None else
                              {"KEXEC_SIG": ctx.cfg("KEXEC_SIG") == "y",
                               "KEXEC_SIG_FORCE": ctx.cfg("KEXEC_SIG_FORCE") == "y"}))
    if core:
        ctx.add("kexec.loaded", Read(loaded.path, loaded.value == 1) if loaded.ok else loaded)
        ctx.add("kexec.load_disabled", ctx.root.read_int("/proc/sys/kernel/kexec_load_disabled"))


def _ranges(text: str) -> list[int]:
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _cpus(ctx: PlatformFacts) -> None:
    base = "/sys/devices/system/cpu"
    for name in ("present", "online", "offline"):
        line = ctx.root.read_line(f"{base}/{name}")
        try:
            value = Read(line.path, _ranges(line.value)) if line.ok and line.value is not None \
                else line
        except ValueError:
            value = Read(line.path, error="garbage", detail=line.value)
        ctx.add(f"cpus.{name}", value)
    entries = ctx.root.listdir(base)
    if entries.ok and entries.value is not None:
        cpus = sorted(int(e[3:]) for e in entries.value if re.fullmatch(r"cpu\d+", e))
        # An `online` file exists only for hot-pluggable CPUs (ecosystem.md §4.1).
        ctx.add("cpus.offlinable", Read(f"{base}/cpuN/online",
                                        [c for c in cpus
                                         if ctx.root.exists(f"{base}/cpu{c}/online")]))
    reboot = ctx.root.read_int("/sys/kernel/reboot/cpu")
    ctx.add("cpus.reboot_cpu", reboot)
    ctx.add("cpus.smt_control", ctx.root.read_line(f"{base}/smt/control"))


_IOMMU_OFF = {("intel_iommu", "off"), ("amd_iommu", "off"), ("iommu", "off")}
_IOMMU_PT = {("iommu", "pt"), ("iommu.passthrough", "1"), ("iommu.passthrough", "on"),
             ("amd_iommu", "pt")}


def _iommu(ctx: PlatformFacts) -> None:
    tables = "/sys/firmware/acpi/tables"
    ctx.add("iommu.dmar", Read(f"{tables}/DMAR", ctx.root.exists(f"{tables}/DMAR")))
    ctx.add("iommu.ivrs", Read(f"{tables}/IVRS", ctx.root.exists(f"{tables}/IVRS")))
    units = ctx.root.listdir("/sys/class/iommu")
    ctx.add("iommu.units", units if units.ok or units.error != NOT_PRESENT
            else Read(units.path, []))
    off, pt, lazy = [], [], []
    for arg in _kernel_args(ctx):
        key, _, val = arg.partition("=")
        for v in val.split(","):
            if (key, v) in _IOMMU_OFF:
                off.append(arg)
            if (key, v) in _IOMMU_PT:
                pt.append(arg)
        if arg == "iommu.strict=0":
            lazy.append(arg)
    ctx.add("iommu.cmdline", Read("/proc/cmdline", {"disabled": off, "passthrough": pt,
                                                     "lazy": lazy})
            if ctx.facts["kernel.cmdline"].ok else ctx.facts["kernel.cmdline"])


def _kernel_args(ctx: PlatformFacts) -> list[str]:
    line = ctx.value("kernel.cmdline") or ""
    return line.split(" -- ", 1)[0].split()   # after "--" the words belong to init


def _tpm_pcrs(ctx: PlatformFacts, config: ProbeConfig) -> None:
    tcti = config.tpm_tcti or tpmfacts.default_tcti(ctx.root)
    if tcti is None:
        ctx.add("tpm.drtm_pcrs", Read(tpmfacts.DEVICE_RM, error=NOT_PRESENT,
                                      detail="no TPM device to ask (use --tpm-tcti)"))
        return
    read = tpmfacts.read_drtm_pcrs(tcti)
    if read.ok and read.value is not None:
        v = read.value
        read = Read(read.path, {"bank": v.bank, "pcrs": {str(k): h for k, h in v.values.items()},
                                "reset_state": v.reset_state})
    ctx.add("tpm.drtm_pcrs", read)


def _intel(ctx: PlatformFacts, config: ProbeConfig) -> None:
    if ctx.vendor != "GenuineIntel":
        return
    ctx.add("launch.dl_handler", _dl_handler(ctx, config.dl_handler))
    if "smx" not in ctx.flags:
        return   # no SMX: 0xFED30000 is not TXT space and MSR 0x3A says nothing about TXT
    msr = ctx.root.read_at(MSR_DEV, MSR_FEATURE_CONTROL, 8)
    if msr.ok and msr.value is not None:
        v = int.from_bytes(msr.value, "little")
        ctx.add("cpu.feature_control", Read(msr.path, {
            "raw": f"0x{v:x}", "locked": bool(v & 1), "vmx_in_smx": bool(v & 2),
            "senter_local": (v >> 8) & 0x7F, "senter_global": bool(v & 0x8000)}))
    else:
        ctx.add("cpu.feature_control", msr)
    if ctx.lockdown not in (None, "none") and not ctx.root.is_dir(txtregs.SECURITYFS_DIR):
        regs: Read = Read("/dev/mem", error=PERMISSION,
                          detail=f"kernel lockdown ({ctx.lockdown}) disables /dev/mem")
    else:
        regs = txtregs.read_registers(ctx.root)
    if regs.ok and isinstance(regs.value, txtregs.TxtRegisters):
        ctx.txt = regs.value
        ctx.add("txt.registers", Read(regs.path, txtregs.decode(ctx.txt)))
        ctx.add("txt.dlme", Read(regs.path, bool((ctx.txt.sts or 0) & 1)))
    else:
        ctx.add("txt.registers", regs)
    _acms(ctx, config)


def _dl_handler(ctx: PlatformFacts, path: str) -> Read:
    """The TXT DL handler: present, and a binary whose header this relaunchd speaks."""
    raw = ctx.root.read_bytes(path, limit=txt_dl_handler.MAX_IMAGE)
    if not raw.ok or raw.value is None:
        if raw.error == NOT_PRESENT:
            return Read(path, {"present": False})
        return Read(path, error=raw.error, detail=raw.detail)
    try:
        image = txt_dl_handler.parse(raw.value)
    except txt_dl_handler.InvalidDlHandler as exc:
        return Read(path, {"present": True, "valid": False, "error": str(exc)})
    return Read(path, {"present": True, "valid": True, "abi": image.header.abi_version,
                       "slrt_layout": image.header.slrt_layout,
                       "sha256": hashlib.sha256(raw.value).hexdigest()})


def _acms(ctx: PlatformFacts, config: ProbeConfig) -> None:
    found: list[dict[str, Any]] = []
    files: list[str] = []
    for d in config.acm_dirs:
        names = ctx.root.listdir(d)
        for n in names.value or []:
            if any(fnmatch.fnmatch(n.lower(), p) for p in ACM_PATTERNS):
                files.append(f"{d.rstrip('/')}/{n}")
    didvid = txtregs.decode_didvid(ctx.txt.didvid) if ctx.txt and ctx.txt.didvid else None
    production = (bool(ctx.txt.ver_emif & (1 << 31))
                  if ctx.txt and ctx.txt.ver_emif is not None else None)
    match = None
    for path in files[:MAX_ACM_FILES]:
        entry: dict[str, Any] = {"path": path}
        raw = ctx.root.read_bytes(path, limit=acmfmt.MAX_MODULE)
        if not raw.ok or raw.value is None:
            entry["error"] = f"{raw.error}: {raw.detail}"
            found.append(entry)
            continue
        try:
            module = acmfmt.parse(raw.value)
        except acmfmt.InvalidAcm as exc:
            entry["error"] = f"{exc.name}: {exc}"
            found.append(entry)
            continue
        h, info = module.header, module.info
        entry.update({
            "sinit": module.is_sinit, "date": h.date_text, "debug_signed": h.debug_signed,
            "os_sinit_data_version": info.os_sinit_data_version,
            "chipsets": [f"{c.vendor_id:04x}:{c.device_id:04x} rev 0x{c.revision_id:x}"
                         + (" (mask)" if c.revision_is_mask else "") for c in info.chipset_ids],
        })
        if didvid is not None:
            chip = module.matching_chipset(didvid.vendor_id, didvid.device_id,
                                           didvid.revision_id)
            entry["chipset_match"] = chip is not None
            entry["processor_match"] = (module.matches_processor(ctx.fms)
                                        if ctx.fms is not None else None)
            # A debug-signed ACM runs only on debug-fused silicon and vice versa (§3.6).
            entry["fuse_match"] = None if production is None else h.debug_signed != production
            fits = (module.is_sinit and chip is not None and entry["fuse_match"] is not False
                    and entry["processor_match"] is not False)
            entry["fits"] = fits
            if fits and match is None:
                match = path
        found.append(entry)
    src = ",".join(config.acm_dirs)
    ctx.add("txt.acms", Read(src, found))
    ctx.add("txt.acm_match", Read(src, match))


def _amd(ctx: PlatformFacts, config: ProbeConfig) -> None:
    if ctx.vendor != "AuthenticAMD":
        return
    ctx.add("launch.skl", Read(config.skl, ctx.root.exists(config.skl)))
    if "svm" not in ctx.flags:
        return
    msr = ctx.root.read_at(MSR_DEV, MSR_VM_CR, 8)
    if msr.ok and msr.value is not None:
        v = int.from_bytes(msr.value, "little")
        ctx.add("cpu.vm_cr", Read(msr.path, {"raw": f"0x{v:x}", "locked": bool(v & 8),
                                             "svm_disabled": bool(v & 0x10)}))
    else:
        ctx.add("cpu.vm_cr", msr)
