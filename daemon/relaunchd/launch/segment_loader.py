"""The x86_64 Secure Launch segment loader: staged kernel/initrd/cmdline →
kexec_load segments carrying an SLRT (drtm.md §2.6, kexec-load-notes.md).

`plan()` is pure apart from reading the platform through one SysRoot (the
firmware memory map, the ACPI RSDP); `load()` makes the syscall. The SLRT
rides in a setup_data node and `boot_params.slr_table_addr` (0x078) points at
it, so a Secure Launch v16 kernel's decompressor finds it and calls
DL_INFO.dl_launch; a stock kernel ignores the field, and the table stays
readable under /sys/kernel/boot_params/setup_data/.

With `SegmentInputs.txt` (launch/dl_handler.py) the plan adds relaunchd's DL
handler, the SINIT ACM, the MLE page tables and the AP wake block, and DL_INFO
points at the handler. Without it the plan is a *hand-off rehearsal*: DL_INFO
carries no DCE and no handler. That proves the loader on machines without TXT but
must only be used with a next kernel that is not itself a Secure Launch kernel.

Sizes in the SLRT are exact, never a segment's page-rounded memsz: the initrd
entry's `size` is what the kernel hashes (docs/slrt-policy.md), `dce_size` the
ACM's own size; `dlme_size`/`dlme_entry` come from the kernel's MLE header, which
exists only after decompression, so the DL handler fills them in.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from relaunchd.errors import NotReady
from relaunchd.formats import slrt
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86 import boot_params, memory_ranges, segment_plan
from relaunchd.launch import dl_handler
from relaunchd.platform import kexec_syscalls, memory_map
from relaunchd.platform.sysroot import SysRoot

LOG_SIZE = 64 << 10          # DRTM event log buffer (TPM 2.0 format)
LOG = "drtm-log"


@dataclass(frozen=True)
class SegmentInputs:
    architecture: int = slrt.ARCH_INTEL_TXT
    txt: dl_handler.TxtLaunch | None = None   # None: hand-off rehearsal
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
    if inputs.txt is not None and inputs.architecture != slrt.ARCH_INTEL_TXT:
        raise NotReady("relaunchd's DL handler launches Intel TXT only")
    mem = memory_map.read_memmap(root)
    # The log buffer must survive into the new kernel: reserved in its e820.
    extras = [segment_plan.SegmentRequest(name=LOG, data=bytes(LOG_SIZE), align=4096, reserve=True)]
    measured_cmdline = slrt.measured_cmdline(cmdline)
    built: dict[str, SlrtContent] = {}
    txt = inputs.txt
    if txt is not None:
        header = boot_params.parse_setup_header(kernel)
        kernel_memsz = -(-max(header.init_size, header.kernel_size) // 4096) * 4096

        def fill_params(addresses) -> bytes:
            return txt.handler.with_params(dl_handler.params(
                txt, addresses, built["table"], mem, kernel=segment_plan.KERNEL, log=LOG))

        extras += dl_handler.blobs(txt, kernel_memsz, fill_params)

    def build_slrt(addresses) -> bytes:
        log_addr, log_size = addresses[LOG]
        # The initrd entry measures the initrd's own bytes, not its page-rounded segment.
        initrd_region = (slrt.Region(addresses[segment_plan.INITRD][0], initrd.length)
                         if initrd is not None and segment_plan.INITRD in addresses else None)
        setup = addresses.get(segment_plan.SETUP_DATA, (0, 0))[0]
        policy = slrt.default_policy(
            slrt_base=addresses[segment_plan.SLRT][0],
            cmdline=slrt.Region(addresses[segment_plan.CMDLINE][0], len(measured_cmdline)),
            zero_page=addresses[segment_plan.ZERO_PAGE][0], initrd=initrd_region,
            setup_data=setup, seal_pcr=inputs.seal_pcr, data_pcr=inputs.data_pcr)
        dl = (dl_handler.dl_info(txt, addresses, kernel=segment_plan.KERNEL,
                                 zero_page=segment_plan.ZERO_PAGE) if txt is not None else
              slrt.DlInfo(dce_base=0, dce_size=0, dlme_base=addresses[segment_plan.KERNEL][0],
                          dlme_size=0, dlme_entry=0, dl_launch=0,
                          dlme_config_table=addresses[segment_plan.ZERO_PAGE][0]))
        entries: list = [dl, slrt.LogInfo(addr=log_addr, size=log_size), policy]
        intel_info = None
        if inputs.architecture == slrt.ARCH_INTEL_TXT:
            # The saved MSRs (or zeros in a rehearsal) and where the zero page went.
            intel_info = dataclasses.replace(
                inputs.intel_info or slrt.IntelInfo(txt_heap=0, saved_misc_enable=0,
                                                    default_mem_type=0),
                boot_params_addr=addresses[segment_plan.ZERO_PAGE][0])
            entries.append(intel_info)
        table = slrt.Table(architecture=inputs.architecture, entries=tuple(entries))
        built["table"] = table
        built["slrt"] = SlrtContent(slrt.build(table, layout=inputs.layout), policy,
                                    intel_info, inputs.seal_pcr, inputs.layout)
        return built["slrt"].table

    builder = segment_plan.SlrtBuilder(size=slrt.DEFAULT_MAX_SIZE, build=build_slrt)
    result = segment_plan.plan_segments(kernel, cmdline=measured_cmdline, memmap=mem,
                                        initrd=initrd, slrt=builder, extras=extras,
                                        firmware=segment_plan.FirmwareInfo(acpi_rsdp=acpi_rsdp(root)),
                                        kernel_below_4g=txt is not None,
                                        ceiling=(dl_handler.pmrs(mem).lo_size if txt is not None
                                                 else memory_ranges.FOUR_GIB))
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
