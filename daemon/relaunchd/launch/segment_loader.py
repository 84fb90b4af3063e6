"""The x86_64 Secure Launch segment loader: staged kernel/initrd/cmdline →
kexec_load segments carrying an SLRT (drtm.md §2.6, kexec-load-notes.md).

`plan()` is pure apart from reading the platform through one SysRoot (the
firmware memory map, the ACPI RSDP); `load()` makes the syscall. The SLRT
rides in a setup_data node and `boot_params.slr_table_addr` (0x078) points at
it, so a Secure Launch v16 kernel's decompressor finds it and calls
DL_INFO.dl_launch; a stock kernel ignores the field, and the table stays
readable under /sys/kernel/boot_params/setup_data/.

Without a DL handler and SINIT ACM (`SegmentInputs.dce is None`) the plan is a
*hand-off rehearsal*: DL_INFO carries no DCE and no handler. That proves the
loader on machines without TXT but must only be used with a next kernel that
is not itself a Secure Launch kernel.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from relaunchd.errors import NotReady
from relaunchd.formats import slrt
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86 import segment_plan
from relaunchd.platform import kexec_syscalls, memory_map
from relaunchd.platform.sysroot import SysRoot

LOG_SIZE = 64 << 10          # DRTM event log buffer (TPM 2.0 format)
MLE_ENTRY_OFFSET = 0x200     # startup_64: the 64-bit entry of the protected-mode kernel


@dataclass(frozen=True)
class SegmentInputs:
    architecture: int = slrt.ARCH_INTEL_TXT
    dce: bytes | None = None             # SINIT ACM (Intel) — None: rehearsal
    dl_handler: bytes | None = None
    dl_handler_entry: int = 0            # offset of the handler's entry in its blob
    intel_info: slrt.IntelInfo | None = None
    seal_pcr: int = slrt.SEAL_PCR
    data_pcr: int = slrt.DATA_PCR
    layout: int = slrt.LAYOUT_V16


@dataclass(frozen=True)
class SlrtContent:
    """The SLRT as placed, and the parts of it a PCR prediction needs."""

    table: bytes
    policy: slrt.EntryPolicy
    intel_info: slrt.IntelInfo | None     # None on AMD
    seal_pcr: int
    layout: int


def plan(kernel: FileRange, initrd: FileRange | None, cmdline: bytes, root: SysRoot,
         inputs: SegmentInputs) -> tuple[segment_plan.SegmentPlan, SlrtContent]:
    """Place every segment and build the zero page and SLRT; returns the plan
    and the SLRT as placed."""
    if (inputs.dce is None) != (inputs.dl_handler is None):
        raise NotReady("a DRTM launch needs both the DCE (SINIT ACM) and the DL handler")
    mem = memory_map.read_memmap(root)
    # The log buffer must survive into the new kernel: reserved in its e820.
    extras = [segment_plan.SegmentRequest(name="drtm-log", data=bytes(LOG_SIZE), align=4096,
                                          reserve=True)]
    if inputs.dce is not None:
        # SINIT needs 4 KiB alignment and lives below 4 GiB (TXT SDG §A.1).
        extras.append(segment_plan.SegmentRequest(name="sinit", data=inputs.dce, align=4096))
        extras.append(segment_plan.SegmentRequest(name="dl-handler", data=inputs.dl_handler or b"",
                                    align=4096))
    measured_cmdline = slrt.measured_cmdline(cmdline)
    built: dict[str, SlrtContent] = {}

    def build_slrt(addresses) -> bytes:
        kernel_base, kernel_size = addresses[segment_plan.KERNEL]
        log_addr, log_size = addresses["drtm-log"]
        dce_base, dce_size = addresses.get("sinit", (0, 0))
        handler = addresses.get("dl-handler")
        initrd_region = (slrt.Region(*addresses[segment_plan.INITRD])
                         if segment_plan.INITRD in addresses else None)
        setup = addresses.get(segment_plan.SETUP_DATA, (0, 0))[0]
        policy = slrt.default_policy(
            slrt_base=addresses[segment_plan.SLRT][0],
            cmdline=slrt.Region(addresses[segment_plan.CMDLINE][0], len(measured_cmdline)),
            zero_page=addresses[segment_plan.ZERO_PAGE][0], initrd=initrd_region,
            setup_data=setup, seal_pcr=inputs.seal_pcr, data_pcr=inputs.data_pcr)
        entries: list = [
            slrt.DlInfo(dce_base=dce_base, dce_size=dce_size, dlme_base=kernel_base,
                        dlme_size=kernel_size, dlme_entry=MLE_ENTRY_OFFSET,
                        dl_launch=(handler[0] + inputs.dl_handler_entry) if handler else 0,
                        dlme_config_table=addresses[segment_plan.ZERO_PAGE][0]),
            slrt.LogInfo(addr=log_addr, size=log_size),
            policy,
        ]
        intel_info = None
        if inputs.architecture == slrt.ARCH_INTEL_TXT:
            # The saved MSRs (or zeros in a rehearsal) and where the zero page went.
            intel_info = dataclasses.replace(
                inputs.intel_info or slrt.IntelInfo(txt_heap=0, saved_misc_enable=0,
                                                    default_mem_type=0),
                # v10-v14 INTEL_INFO has no boot_params_addr (it is in OS2MLE there).
                boot_params_addr=addresses[segment_plan.ZERO_PAGE][0] if inputs.layout >= 15 else 0)
            entries.append(intel_info)
        table = slrt.Table(architecture=inputs.architecture, entries=tuple(entries))
        built["slrt"] = SlrtContent(slrt.build(table, layout=inputs.layout), policy,
                                    intel_info, inputs.seal_pcr, inputs.layout)
        return built["slrt"].table

    builder = segment_plan.SlrtBuilder(size=slrt.DEFAULT_MAX_SIZE, build=build_slrt)
    result = segment_plan.plan_segments(kernel, cmdline=measured_cmdline, memmap=mem,
                                    initrd=initrd, slrt=builder, extras=extras,
                                    firmware=segment_plan.FirmwareInfo(acpi_rsdp=acpi_rsdp(root)))
    return result, built["slrt"]


def predicted_events(content: SlrtContent, *, cmdline: bytes,
                     initrd_digests: dict[str, bytes] | None,
                     banks: tuple[str, ...] = ("sha256",)) -> list[slrt.PredictedEvent]:
    """The SL_EVTYPE_SECURE_LAUNCH events a Secure Launch kernel will extend into the
    sealing PCR for this SLRT (docs/slrt-policy.md "Predictions"); [] on AMD, whose
    SKL path relaunchd does not build yet."""
    if content.intel_info is None:
        return []
    return slrt.sealed_events(content.policy, seal_pcr=content.seal_pcr,
                              intel_info=content.intel_info, cmdline=cmdline,
                              initrd_digests=initrd_digests, banks=banks,
                              layout=content.layout)


def acpi_rsdp(root: SysRoot) -> int:
    """The RSDP from the EFI system table listing; 0 on a BIOS boot, where the
    decompressor scans for it itself (kexec-load-notes.md)."""
    read = root.read_text("/sys/firmware/efi/systab")
    if not read.ok or read.value is None:
        return 0
    for key in ("ACPI20", "ACPI"):
        m = re.search(rf"^{key}=(0x[0-9a-fA-F]+)$", read.value, re.M)
        if m:
            return int(m.group(1), 16)
    return 0


def load(result: segment_plan.SegmentPlan) -> None:
    """kexec_load the planned segments, entering at the purgatory."""
    kexec_syscalls.segment_load(result.entry, result.segments)
