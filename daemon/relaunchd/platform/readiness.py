"""Platform readiness: facts with their sources, and a verdict per launch method.

Methods (DESIGN.md "Layers"): `txt` (Intel TXT through Secure Launch), `skinit`
(AMD SKINIT with a Secure Kernel Loader) and `kexec` (measured kexec, no DRTM).
Each verdict is a list of checks; a check whose fact could not be read fails
("unknown is not ready"), and says why. Reason ids are stable: they are the
API for update tools and are listed in docs/check.md.

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
from relaunchd.platform.secure_boot import read_efi_bool, read_lockdown
from relaunchd.platform.sysroot import NOT_PRESENT, PERMISSION, Read, SysRoot

METHODS = ("txt", "skinit", "kexec")
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


@dataclass(frozen=True)
class ProbeConfig:
    """Where to look. Paths are platform paths, resolved under `root`."""

    root: str = "/"
    acm_dirs: tuple[str, ...] = ("/boot", "/lib/firmware/intel-txt", "/usr/lib/relaunchd/acm")
    dl_handler: str = "/usr/lib/relaunchd/txt-dl-handler.bin"
    skl: str = "/usr/lib/relaunchd/skl.bin"
    tpm_tcti: str | None = None       # None: the kernel resource manager on the real root only


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


@dataclass(frozen=True)
class Report:
    root: str
    facts: dict[str, Read]
    verdicts: dict[str, Verdict]

    @property
    def best(self) -> str | None:
        """The strongest ready method: a DRTM launch before a plain measured kexec."""
        return next((m for m in METHODS if self.verdicts[m].ready), None)

    def to_json(self) -> dict[str, Any]:
        facts = {}
        for name, r in self.facts.items():
            entry: dict[str, Any] = {"value": r.value, "source": r.path}
            if r.error:
                entry["error"] = r.error
            if r.detail:
                entry["detail"] = r.detail
            facts[name] = entry
        methods = {m: {"ready": v.ready, "reasons": [c.as_reason() for c in v.reasons],
                       "checks": [{**c.as_reason(), "ok": c.ok} for c in v.checks]}
                   for m, v in self.verdicts.items()}
        return {"root": self.root, "best": self.best, "methods": methods, "facts": facts}


@dataclass
class _Ctx:
    """Typed values the verdicts need, next to the JSON-ready facts."""

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


def probe(config: ProbeConfig | None = None) -> Report:
    config = config or ProbeConfig()
    ctx = _Ctx(SysRoot(config.root))
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
    verdicts = {"txt": Verdict("txt", tuple(_txt_checks(ctx))),
                "skinit": Verdict("skinit", tuple(_skinit_checks(ctx))),
                "kexec": Verdict("kexec", tuple(_kexec_checks(ctx)))}
    return Report(ctx.root.root, ctx.facts, verdicts)


# ---------------------------------------------------------------- facts

def _cpu(ctx: _Ctx) -> None:
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


def _kernel(ctx: _Ctx) -> None:
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


def _efi(ctx: _Ctx) -> None:
    uefi = ctx.root.is_dir("/sys/firmware/efi")
    ctx.add("boot.firmware", Read("/sys/firmware/efi", "uefi" if uefi else "bios"))
    if not uefi:
        return
    for fact, var in (("boot.secure_boot", "SecureBoot"), ("boot.setup_mode", "SetupMode")):
        ctx.add(fact, read_efi_bool(ctx.root, var))


def _lockdown(ctx: _Ctx) -> None:
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


def _kexec(ctx: _Ctx) -> None:
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


def _cpus(ctx: _Ctx) -> None:
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


def _iommu(ctx: _Ctx) -> None:
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


def _kernel_args(ctx: _Ctx) -> list[str]:
    line = ctx.value("kernel.cmdline") or ""
    return line.split(" -- ", 1)[0].split()   # after "--" the words belong to init


def _tpm_pcrs(ctx: _Ctx, config: ProbeConfig) -> None:
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


def _intel(ctx: _Ctx, config: ProbeConfig) -> None:
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


def _dl_handler(ctx: _Ctx, path: str) -> Read:
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


def _acms(ctx: _Ctx, config: ProbeConfig) -> None:
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


def _amd(ctx: _Ctx, config: ProbeConfig) -> None:
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


# ---------------------------------------------------------------- verdicts

def _arch_checks(ctx: _Ctx, vendor: str, what: str) -> list[Check]:
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


def _kexec_support_check(ctx: _Ctx, syscall: str) -> Check:
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


def _kexec_enabled_check(ctx: _Ctx) -> Check | None:
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


def _lockdown_known(ctx: _Ctx) -> Check | None:
    if ctx.lockdown is None:
        return Check("lockdown-unknown", None,
                     f"kernel lockdown state unknown: {ctx.why('kernel.lockdown')}",
                     "mount securityfs on /sys/kernel/security")
    return None


def _tpm_checks(ctx: _Ctx, need_tis: str | None) -> list[Check]:
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


def _iommu_checks(ctx: _Ctx, table: str) -> list[Check]:
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


def _drtm_common(ctx: _Ctx) -> list[Check]:
    """What any DRTM relaunch needs from the running kernel (drtm.md §2.6, §5)."""
    out = [_kexec_support_check(ctx, "kexec_load")]
    if (c := _kexec_enabled_check(ctx)) is not None:
        out.append(c)
    if (c := _lockdown_known(ctx)) is not None:
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


def _txt_checks(ctx: _Ctx) -> list[Check]:
    out = _arch_checks(ctx, "GenuineIntel", "Intel TXT")
    vendor_ok = bool(out[-1].ok)
    if vendor_ok:
        out += _txt_hardware(ctx)
    if vendor_ok and "smx" in ctx.flags:   # without SMX the rest cannot matter
        out += _iommu_checks(ctx, "DMAR")
        out += _txt_acm(ctx)
        out.append(_dl_handler_check(ctx))
    out += _tpm_checks(ctx, "Secure Launch's early TPM driver refuses CRB" if vendor_ok else None)
    out += _drtm_common(ctx)
    return out


def _dl_handler_check(ctx: _Ctx) -> Check:
    fact = ctx.facts["launch.dl_handler"]
    value = ctx.value("launch.dl_handler")
    if value is None:
        return Check("dl-handler-unreadable", None,
                     f"TXT DL handler unreadable: {ctx.why('launch.dl_handler')}",
                     "run the check as root")
    if not value["present"]:
        return Check("dl-handler-missing", False, f"no TXT DL handler at {fact.path}",
                     "install the relaunchd package (it ships "
                     "/usr/lib/relaunchd/txt-dl-handler.bin) or set txt.dl_handler")
    if not value["valid"]:
        return Check("dl-handler-invalid", False,
                     f"{fact.path} is not a DL handler this relaunchd can use: "
                     f"{value['error']}",
                     "reinstall the relaunchd package, whose handler matches its daemon")
    return Check("dl-handler", True, f"DL handler present (ABI {value['abi']}, SLRT layout "
                 f"v{value['slrt_layout']})")


def _txt_hardware(ctx: _Ctx) -> list[Check]:
    if "smx" not in ctx.flags:
        hv = " (running under a hypervisor)" if "hypervisor" in ctx.flags else ""
        return [Check("cpu-no-smx", False, f"the CPU has no SMX (no smx flag){hv}",
                      "use a TXT-capable CPU, on bare metal")]
    out = [Check("cpu-smx", True, "CPU has SMX")]
    fc = ctx.value("cpu.feature_control")
    if fc is None:
        out.append(Check("feature-control-unreadable", None,
                         f"IA32_FEATURE_CONTROL unreadable: {ctx.why('cpu.feature_control')}",
                         "modprobe msr and run the check as root"))
    elif not fc["locked"] or not (fc["senter_global"] and fc["senter_local"]):
        out.append(Check("txt-disabled-firmware", False,
                         f"TXT is not enabled by firmware (IA32_FEATURE_CONTROL {fc['raw']}: "
                         "needs LOCK and SENTER enables)", "enable Intel TXT in firmware setup"))
    else:
        out.append(Check("txt-enabled-firmware", True, "TXT enabled in IA32_FEATURE_CONTROL"))
    regs = ctx.facts["txt.registers"]
    r = ctx.txt
    if r is None:
        if regs.detail == txtregs.ABSENT_DETAIL:
            out.append(Check("txt-chipset-absent", False,
                             f"no TXT chipset answers at 0xFED30000 ({regs.detail})",
                             "enable TXT in firmware; the chipset may not support it"))
        else:
            out.append(Check("txt-regs-unreadable", None,
                             f"TXT registers unreadable: {ctx.why('txt.registers')}",
                             "run as root on a kernel with /dev/mem and without lockdown"))
        return out
    did = txtregs.decode_didvid(r.didvid) if r.didvid is not None else None
    if did is not None and did.vendor_id != acmfmt.VENDOR_INTEL:
        out.append(Check("txt-chipset-absent", False,
                         f"TXT.DIDVID vendor 0x{did.vendor_id:04x} is not Intel",
                         "enable TXT in firmware"))
        return out
    if r.ests is not None and r.ests & 1:
        out.append(Check("txt-reset-sticky", False,
                         "TXT.ESTS.TXT_RESET is set: SENTER fails until a power cycle",
                         "power the machine off and on (a reboot does not clear it)"))
    if r.errorcode is not None:
        err = txtregs.decode_errorcode(r.errorcode)
        if err.valid and not err.success:
            out.append(Check("txt-error", False, f"TXT.ERRORCODE 0x{r.errorcode:08x}: {err.text}",
                             "fix the cause of the last failed launch, then power-cycle"))
    if not (r.heap_base and r.heap_size) and r.heap_base is not None:
        out.append(Check("txt-heap-missing", False, "TXT heap base/size are zero",
                         "enable TXT in firmware (the BIOS sets up the heap)"))
    if not (r.sinit_base and r.sinit_size) and r.sinit_base is not None:
        out.append(Check("sinit-region-missing", False, "SINIT memory base/size are zero",
                         "enable TXT in firmware (the BIOS reserves the SINIT region)"))
    if all(c.ok for c in out):
        out.append(Check("txt-registers", True, "TXT registers report no error"))
    return out


def _txt_acm(ctx: _Ctx) -> list[Check]:
    if "smx" not in ctx.flags or "txt.acms" not in ctx.facts:
        return []
    acms = ctx.value("txt.acms") or []
    if ctx.value("txt.acm_match"):
        return [Check("sinit-acm", True, f"SINIT ACM {ctx.value('txt.acm_match')} fits")]
    if not acms:
        return [Check("sinit-acm-missing", False, "no SINIT ACM file found in "
                      f"{ctx.facts['txt.acms'].path}",
                      "download Intel's SINIT ACM for this chipset to /boot")]
    if ctx.txt is None or ctx.txt.didvid is None:
        return [Check("sinit-acm-unverified", None,
                      "SINIT ACMs found but the chipset ID (TXT.DIDVID) is unknown",
                      "make the TXT registers readable; ACMs are matched against TXT.DIDVID")]
    did = txtregs.decode_didvid(ctx.txt.didvid)
    chip = f"{did.vendor_id:04x}:{did.device_id:04x} rev 0x{did.revision_id:x}"
    if any(a.get("chipset_match") for a in acms):
        return [Check("sinit-acm-fuse-mismatch", False,
                      f"an ACM lists chipset {chip} but its signing (debug/production) or "
                      "processor list does not fit this machine",
                      "use the production-signed SINIT ACM for this platform")]
    return [Check("sinit-acm-mismatch", False, f"no SINIT ACM matches chipset {chip}",
                  "download the SINIT ACM for this chipset generation to /boot")]


def _skinit_checks(ctx: _Ctx) -> list[Check]:
    out = _arch_checks(ctx, "AuthenticAMD", "AMD SKINIT")
    vendor_ok = bool(out[-1].ok)
    if vendor_ok:
        # Secure Launch v16 is Intel-only: its stub stops on CPUs without SMX, and the
        # AMD Secure Kernel Loader path is not posted upstream (dl-handler.md "AMD").
        out.append(Check("skinit-no-kernel-support", False,
                         "no Secure Launch kernel accepts an SKINIT launch: the v16 series "
                         "is Intel TXT only (its entry stub stops on CPUs without SMX)",
                         "use the kexec method (measured kexec) on AMD until Secure Launch "
                         "supports SKINIT"))
    if vendor_ok:
        for flag in ("svm", "skinit"):
            if flag not in ctx.flags:
                out.append(Check(f"cpu-no-{flag}", False, f"the CPU has no {flag} flag",
                                 "use an SKINIT-capable AMD CPU on bare metal"))
        vm_cr = ctx.value("cpu.vm_cr")
        if "svm" in ctx.flags:
            if vm_cr is None:
                out.append(Check("svm-state-unknown", None,
                                 f"VM_CR unreadable: {ctx.why('cpu.vm_cr')}",
                                 "modprobe msr and run the check as root"))
            elif vm_cr["svm_disabled"]:
                out.append(Check("svm-disabled", False, "SVM is disabled by firmware "
                                 "(VM_CR.SVMDIS)", "enable SVM in firmware setup"))
            else:
                out.append(Check("svm-enabled", True, "SVM enabled"))
        out += _iommu_checks(ctx, "IVRS")
        out.append(Check("skl", True, "Secure Kernel Loader present")
                   if ctx.value("launch.skl") else
                   Check("skl-missing", False,
                         f"no Secure Kernel Loader at {ctx.facts['launch.skl'].path}",
                         "install TrenchBoot's skl.bin or pass --skl"))
    out += _tpm_checks(ctx, "SKINIT needs a discrete TPM on TIS" if vendor_ok else None)
    out += _drtm_common(ctx)
    return out


def _kexec_checks(ctx: _Ctx) -> list[Check]:
    out = [_kexec_support_check(ctx, "kexec_file_load")]
    if (c := _kexec_enabled_check(ctx)) is not None:
        out.append(c)
    if (c := _lockdown_known(ctx)) is not None:
        out.append(c)
    else:
        sig = ctx.value("kexec.sig") or {}
        if ctx.lockdown != "none" and not sig.get("KEXEC_SIG"):
            out.append(Check("lockdown-unsigned-kexec", False,
                             f"kernel lockdown ({ctx.lockdown}) refuses kexec_file_load "
                             "and the kernel cannot verify signatures (no CONFIG_KEXEC_SIG)",
                             "boot a kernel with CONFIG_KEXEC_SIG or without lockdown"))
        elif ctx.lockdown != "none" or sig.get("KEXEC_SIG_FORCE"):
            out.append(Check("kexec-signed-only", True,
                             "kexec_file_load accepts only kernels signed by a key the kernel "
                             "trusts (lockdown/KEXEC_SIG_FORCE)"))
        else:
            out.append(Check("lockdown-none", True, "no kernel lockdown"))
    out += _tpm_checks(ctx, None)
    return out
