"""A staged TXT relaunch laid out in an emulated machine (tests/support/txt_machine.py):
the built DL handler with its parameter block, an SLRT as relaunchd builds it
(formats/slrt.py), a kernel carrying a v16-shaped MLE header, a SINIT-shaped ACM,
the TXT heap's BiosData, and the call the v16 decompressor makes.

The MLE header is written from the v16 layout (arch/x86/kernel/sl_stub.S
mle_header and vmlinux.lds.S: UUID 9082ac5a..., header size 0x34, version 2.2,
entry = sl_stub_entry - _text, start 0, end = __bss_start - _text, capabilities
0x227); the ACM from the SDG Appendix A.1 layout (tests/fixtures/platforms/build.py).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.platforms.build import build_acm
from relaunchd.formats import slrt
from relaunchd.formats import txt_dl_handler as dlh
from support.txt_machine import Outcome, Platform, TxtMachine

REPO = Path(__file__).resolve().parents[2]
HANDLER_BIN = REPO / "build" / "dl-handler" / "txt-dl-handler.bin"
HANDLER_ELF = REPO / "build" / "dl-handler" / "txt-dl-handler.elf"

MLE_UUID = (0x9082AC5A, 0x74A7476F, 0xA2555C0F, 0x42B651CB)
MLE_CAPS_V16 = 0x227
# SDG Table 4: GETSEC wake, MONITOR wake, ECX page tables, D/A PCR usage (bit 5),
# TPM 2.0 TCG log (bit 9).
SINIT_CAPS = 0x227
OS_SINIT_CAPS = (1 << 5) | (1 << 1) | (1 << 2) | (1 << 9)   # what relaunchd requests


@dataclass
class Layout:
    """Physical addresses of everything relaunchd stages (all below 256 MiB here)."""

    handler: int = 0x0300_0000
    kernel: int = 0x0100_0000           # the kexec kernel segment = the MLE base
    kernel_size: int = 0x0080_0000      # init_size: MLE + decompression area
    mle_end: int = 0x0031_5000          # __bss_start - _text
    mle_header_offset: int = 0x0020_3000
    mle_entry: int = 0x0020_4100
    slrt: int = 0x0050_0010             # inside a setup_data node
    zero_page: int = 0x0051_0000
    event_log: int = 0x0060_0000
    event_log_size: int = 0x1_0000
    ap_wake: int = 0x0070_0000
    ap_wake_size: int = 0x1_4000
    sinit_copy: int = 0x0080_0000
    heap: int = 0x0A00_0000
    heap_size: int = 0x000E_0000
    sinit_region: int = 0x0B00_0000
    sinit_region_size: int = 0x0008_0000
    pmr_lo_size: int = 0x0F00_0000

    @property
    def ptab_size(self) -> int:
        pages = -(-self.kernel_size // 4096)
        return (2 + -(-pages // 512)) * 4096

    @property
    def ptab(self) -> int:
        return self.kernel - self.ptab_size


@dataclass
class Scenario:
    platform: Platform = field(default_factory=Platform)
    layout: Layout = field(default_factory=Layout)
    require_drtm: bool = False
    acm: bytes | None = None               # relaunchd's copy; default: a matching SINIT
    bios_acm: bytes | None = None          # what the BIOS left at TXT.SINIT.BASE
    bios_data_version: int = 6
    num_logical_procs: int = 4
    bios_data_size: int = 8 + 36 + 12      # with one END ext element (SDG C.1)
    mle_header: bytes | None = None        # default: the v16 header
    staged_intel_info: slrt.IntelInfo | None = None   # default: what the MSRs say
    la57: bool = False
    params_override: dict = field(default_factory=dict)


def v16_mle_header(lay: Layout, **override: int) -> bytes:
    f = {"header_len": 0x34, "version": 0x00020002, "entry_point": lay.mle_entry,
         "first_valid_page": 0, "start": 0, "end": lay.mle_end,
         "capabilities": MLE_CAPS_V16}
    f.update(override)
    return struct.pack("<4I9I", *MLE_UUID, f["header_len"], f["version"], f["entry_point"],
                       f["first_valid_page"], f["start"], f["end"], f["capabilities"], 0, 0)


def matching_acm(**kw: int) -> bytes:
    args = {"caps": SINIT_CAPS, "fms": 0x806F0, "fms_mask": 0x0FFF3FF0, "min_mle": 0x20000,
            "date": 0x20250115}
    args.update(kw)
    return build_acm(**args)


def intel_info_of(p: Platform, *, txt_heap: int, boot_params: int) -> slrt.IntelInfo:
    pairs = tuple(slrt.MtrrPair(*(p.variable_mtrrs[i] if i < len(p.variable_mtrrs)
                                  else (0, 0))) for i in range(p.mtrr_vcnt))
    return slrt.IntelInfo(txt_heap=txt_heap, saved_misc_enable=p.misc_enable,
                          default_mem_type=p.mtrr_def_type, variable_mtrrs=pairs,
                          boot_params_addr=boot_params)


@dataclass
class Staged:
    machine: TxtMachine
    handler: dlh.HandlerImage
    params: dlh.Params
    table: slrt.Table
    dl_info_at: int
    intel_info_at: int
    kernel: bytes
    acm: bytes
    handler_at: int
    outcome: Outcome | None = None

    def params_after(self) -> dlh.Params:
        """The parameter block as the handler left it (its status, reason, detail)."""
        h = self.handler.header
        return dlh.unpack_params(self.machine.read(self.handler_at + h.params_offset,
                                                   dlh.PARAMS_SIZE))


def stage(sc: Scenario, handler_bytes: bytes | None = None) -> Staged:
    lay, p = sc.layout, sc.platform
    handler = dlh.parse(handler_bytes if handler_bytes is not None
                        else HANDLER_BIN.read_bytes())
    m = TxtMachine(p, la57=sc.la57)
    m.txt.update({0x270: lay.sinit_region, 0x278: lay.sinit_region_size,
                  0x300: lay.heap, 0x308: lay.heap_size})
    m.txt.update(p.txt)

    # The kernel as the decompressor left it: the MLE header at its offset.
    kernel = bytearray(lay.mle_end)
    for i in range(0, lay.mle_end, 4096):           # something to hash on every page
        kernel[i:i + 8] = struct.pack("<Q", lay.kernel + i)
    header = sc.mle_header if sc.mle_header is not None else v16_mle_header(lay)
    kernel[lay.mle_header_offset:lay.mle_header_offset + len(header)] = header
    m.load(lay.kernel, bytes(kernel))

    acm = sc.acm if sc.acm is not None else matching_acm()
    m.load(lay.sinit_copy, acm)
    if sc.bios_acm is not None:
        m.load(lay.sinit_region, sc.bios_acm)

    # BiosData (SDG Appendix C.1) with an END extended element.
    bios = struct.pack("<IIQQIII", sc.bios_data_version,
                       len(sc.bios_acm) if sc.bios_acm else 0, 0, 0, sc.num_logical_procs,
                       0, 0) + struct.pack("<II", 0, 8)
    bios += bytes(sc.bios_data_size - 8 - len(bios))
    m.load(lay.heap, struct.pack("<Q", sc.bios_data_size) + bios)

    # The SLRT exactly as relaunchd builds it at stage time (v16 layout).
    handler_entry = lay.handler + handler.header.entry_offset
    params_at = lay.handler + handler.header.params_offset
    info = sc.staged_intel_info or intel_info_of(p, txt_heap=lay.heap,
                                                 boot_params=lay.zero_page)
    table = slrt.Table(slrt.ARCH_INTEL_TXT, (
        slrt.DlInfo(dce_base=lay.sinit_copy, dce_size=len(acm), dlme_base=lay.kernel,
                    dlme_size=0, dlme_entry=0, dl_launch=handler_entry,
                    bl_context=slrt.BlContext(slrt.BOOTLOADER_GRUB, params_at),
                    dlme_config_table=lay.zero_page),
        slrt.LogInfo(lay.event_log, lay.event_log_size),
        slrt.default_policy(slrt_base=lay.slrt, cmdline=slrt.Region(0x0052_0000, 16),
                            zero_page=lay.zero_page),
        info,
    ))
    m.load(lay.slrt, slrt.build(table))
    dl_at = lay.slrt + slrt.entry_offset(table, slrt.TAG_DL_INFO)
    ii_at = lay.slrt + slrt.entry_offset(table, slrt.TAG_INTEL_INFO)

    params = dlh.Params(
        flags=dlh.FLAG_REQUIRE_DRTM if sc.require_drtm else 0,
        os_sinit_caps=OS_SINIT_CAPS, slrt=lay.slrt, dl_info=dl_at, intel_info=ii_at,
        sinit=lay.sinit_copy, sinit_size=len(acm), kernel_base=lay.kernel,
        kernel_size=lay.kernel_size, mle_ptab=lay.ptab, mle_ptab_size=lay.ptab_size,
        ap_wake_block=lay.ap_wake, ap_wake_block_size=lay.ap_wake_size,
        event_log=lay.event_log, event_log_size=lay.event_log_size,
        pmr_lo_base=0, pmr_lo_size=lay.pmr_lo_size, pmr_hi_base=0x1_0000_0000,
        pmr_hi_size=0x8000_0000, rsdp=0x000F_5A40, os_sinit_flags=1,
        min_mle_version=0x00020000)
    params = dataclasses.replace(params, **sc.params_override)
    m.load(lay.handler, handler.with_params(params))
    return Staged(m, handler, params, table, dl_at, ii_at, bytes(kernel), acm, lay.handler)


def run(sc: Scenario, handler_bytes: bytes | None = None) -> Staged:
    st = stage(sc, handler_bytes)
    lay = sc.layout
    bl_context = st.dl_info_at + 64            # &DL_INFO.bl_context (v16 slr_table.h)
    dlme = (lay.kernel, lay.mle_header_offset, 0)   # misc.c: dlme_table = 0
    image_end = lay.handler + st.handler.header.image_size
    st.outcome = st.machine.call(lay.handler + st.handler.header.entry_offset,
                                 (lay.handler, image_end), bl_context, dlme)
    return st
