"""The `txt` method: an Intel TXT dynamic launch into a Secure Launch kernel (launch layer).

The segment loader places the SINIT ACM (the DCE), relaunchd's DL handler and the SLRT; the
Secure Launch kernel's decompressor calls the handler, which executes GETSEC[SENTER]
(dl-handler.md). This module decides whether the machine is ready (`verdict`) and gathers
what the launch needs (`segment_inputs`): the ACM, the handler, and INTEL_INFO as the CPU
is now (the kernel compares the MTRRs and MISC_ENABLE after the launch).
"""

from __future__ import annotations

from relaunchd.errors import NotReady
from relaunchd.formats import acm as acmfmt
from relaunchd.formats import slrt
from relaunchd.launch import checks, dl_handler, segment_loader
from relaunchd.launch.checks import Check, Verdict
from relaunchd.launch.protocol import LaunchRequest
from relaunchd.launch.segment_loader import SegmentInputs
from relaunchd.platform import txt_registers as txtregs
from relaunchd.platform.readiness import MSR_DEV, PlatformFacts, read_facts
from relaunchd.platform.sysroot import SysRoot


class TxtMethod:
    name = "txt"
    drtm = True
    default_loader = "segments"

    def verdict(self, facts: PlatformFacts) -> Verdict:
        return Verdict(self.name, tuple(_txt_checks(facts)))

    def segment_inputs(self, request: LaunchRequest) -> SegmentInputs:
        """The ACM, the DL handler and INTEL_INFO; NotReady for anything missing. The facts
        come from the configured probe (ACM directories, handler path), so the stage-time
        verdict is the one `Capabilities` shows."""
        facts = read_facts(request.probe_config)
        verdict = self.verdict(facts)
        if not verdict.ready:
            raise NotReady(f"the {self.name} method is not ready: {verdict.summary()}")
        acm_path = request.sinit_acm or facts.value("txt.acm_match")
        if not acm_path:
            raise NotReady("the txt method needs a SINIT ACM (txt.sinit_acm in the "
                           "configuration, or one in txt.sinit_acm_dirs that fits)")
        handler_path = request.dl_handler or request.probe_config.dl_handler
        # Both are platform paths under the root; dl_handler reads them by descriptor,
        # checks the ACM against this chipset and CPU, and validates the handler.
        launch = dl_handler.prepare(request.root.host_path(handler_path),
                                    request.root.host_path(acm_path),
                                    dl_handler.platform_ids(facts),
                                    require_drtm=request.require_drtm,
                                    rsdp=segment_loader.acpi_rsdp(request.root))
        return SegmentInputs(txt=launch, intel_info=_intel_info(request.root, facts))


def _intel_info(root: SysRoot, facts: PlatformFacts) -> slrt.IntelInfo:
    """INTEL_INFO as the DL handler will find the CPU: IA32_MISC_ENABLE, MTRRdefType and
    the variable MTRRs from /dev/cpu/0/msr, the TXT heap base from the TXT registers
    (drtm.md §1.4). The kernel compares them after the launch, so guessing is no
    option: unreadable → NotReady."""
    def rdmsr(index: int) -> int:
        read = root.read_at(MSR_DEV, index, 8)
        if not read.ok or read.value is None:
            raise NotReady(f"cannot read MSR {index:#x} from {MSR_DEV} ({read.error}: "
                           f"{read.detail}); `modprobe msr` and run as root")
        return int.from_bytes(read.value, "little")

    heap = facts.txt.heap_base if facts.txt is not None else None
    if not heap:
        raise NotReady("the TXT heap base is unknown (TXT registers unreadable or zero); "
                       "see `relaunchctl check --method txt`")
    return slrt.intel_info_from_msrs(rdmsr, txt_heap=heap)


def _txt_checks(ctx: PlatformFacts) -> list[Check]:
    out = checks.arch_checks(ctx, "GenuineIntel", "Intel TXT")
    vendor_ok = bool(out[-1].ok)
    if vendor_ok:
        out += _txt_hardware(ctx)
    if vendor_ok and "smx" in ctx.flags:   # without SMX the rest cannot matter
        out += checks.iommu_checks(ctx, "DMAR")
        out += _txt_acm(ctx)
        out.append(_dl_handler_check(ctx))
    crb_refused = "Secure Launch's early TPM driver refuses CRB"
    out += checks.tpm_checks(ctx, crb_refused if vendor_ok else None)
    out += checks.drtm_common(ctx)
    return out


def _dl_handler_check(ctx: PlatformFacts) -> Check:
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


def _txt_hardware(ctx: PlatformFacts) -> list[Check]:
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


def _txt_acm(ctx: PlatformFacts) -> list[Check]:
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
