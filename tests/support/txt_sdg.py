"""Decoders for what the DL handler writes, written from the published tables, not
from relaunchd's own code (which builds none of these structures): the Intel TXT
Software Development Guide 315168 Appendix C heap tables (as restated, byte for
byte, in the Secure Launch v16 series' arch/x86/include/asm/txt.h, patch 20/38,
and include/linux/slaunch.h, patch 19/38), SDG 2.2.4.1 MLE page tables, and the
Intel SDM vol. 3A 12.11 MTRR register formats.

Every offset is spelled out here on purpose: a test that decoded the handler's
output with the handler's own structure definitions would only prove that the
handler agrees with itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

Read = Callable[[int, int], bytes]        # (physical address, length) -> bytes


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


@dataclass(frozen=True)
class HeapTable:
    size: int          # the u64 in front of the table, which counts itself
    address: int       # of the table body (after the size)
    body: bytes


def heap_tables(read: Read, heap_base: int) -> list[HeapTable]:
    """SDG Appendix C: BiosData, OsMleData, OsSinitData, SinitMleData, each preceded
    by a u64 size that includes those 8 bytes. Stops at a zero size."""
    out = []
    at = heap_base
    for _ in range(4):
        size = u64(read(at, 8), 0)
        if size < 8:
            break
        out.append(HeapTable(size, at + 8, read(at + 8, size - 8)))
        at += size
    return out


@dataclass(frozen=True)
class OsMleData:
    """Secure Launch OsMleData v1, v16 slaunch.h: version@0 reserved@4 slrt@8
    txt_info@16 ap_wake_block@24 ap_wake_block_size@28 mle_scratch[64]@32 (96 B)."""

    version: int
    reserved: int
    slrt: int
    txt_info: int
    ap_wake_block: int
    ap_wake_block_size: int
    scratch: bytes


def os_mle_data(body: bytes) -> OsMleData:
    assert len(body) == 96, len(body)
    return OsMleData(u32(body, 0), u32(body, 4), u64(body, 8), u64(body, 16), u32(body, 24),
                     u32(body, 28), body[32:96])


@dataclass(frozen=True)
class ExtElement:
    type: int
    size: int
    data: bytes


@dataclass(frozen=True)
class OsSinitData:
    """SDG Appendix C OsSinitData (v16 txt.h): version@0 flags@4 mle_ptab@8 mle_size@16
    mle_hdr_base@24 vtd_pmr_lo_base@32 lo_size@40 hi_base@48 hi_size@56
    lcp_po_base@64 lcp_po_size@72 capabilities@80 efi_rsdt_ptr@84, extended data
    elements from @92 ({u32 type; u32 size including the header}, END = type 0)."""

    version: int
    flags: int
    mle_ptab: int
    mle_size: int
    mle_hdr_base: int
    pmr_lo_base: int
    pmr_lo_size: int
    pmr_hi_base: int
    pmr_hi_size: int
    lcp_po_base: int
    lcp_po_size: int
    capabilities: int
    efi_rsdt_ptr: int
    elements: tuple[ExtElement, ...]


def os_sinit_data(body: bytes) -> OsSinitData:
    elements = []
    off = 92
    while True:
        etype, esize = struct.unpack_from("<II", body, off)
        assert esize >= 8 and off + esize <= len(body), (etype, esize)
        elements.append(ExtElement(etype, esize, body[off + 8:off + esize]))
        off += esize
        if etype == 0:
            break
    assert off == len(body), f"{len(body) - off} bytes after the END element"
    return OsSinitData(u32(body, 0), u32(body, 4), *(u64(body, o) for o in range(8, 80, 8)),
                       u32(body, 80), u64(body, 84), tuple(elements))


@dataclass(frozen=True)
class EventLogPointer21:
    """Extended element 8, HEAP_EVENT_LOG_POINTER_ELEMENT2_1 (SDG C.5): phys_addr@0
    allocated_event_container_size@8 first_record_offset@12 next_record_offset@16."""

    phys_addr: int
    allocated_size: int
    first_record_offset: int
    next_record_offset: int


def event_log_pointer21(data: bytes) -> EventLogPointer21:
    assert len(data) == 20, len(data)
    return EventLogPointer21(u64(data, 0), u32(data, 8), u32(data, 12), u32(data, 16))


@dataclass(frozen=True)
class BiosData:
    """SDG Appendix C BiosData: version@0 bios_sinit_size@4 reserved@8,16
    num_logical_procs@24 sinit_flags@28 mle_flags@32."""

    version: int
    bios_sinit_size: int
    num_logical_procs: int


def bios_data(body: bytes) -> BiosData:
    return BiosData(u32(body, 0), u32(body, 4), u32(body, 24))


def walk_mle_page_tables(read: Read, ptab: int, linear: int) -> int:
    """Translate an MLE linear address through the MLE page tables (SDG 2.2.4.1: a
    PDPT, page directories and page tables of 8-byte entries, 4 KiB pages, the
    physical frame in bits 51:12, bit 0 present). Raises AssertionError on a
    non-present entry."""
    pdpte = u64(read(ptab + 8 * ((linear >> 30) & 3), 8), 0)
    assert pdpte & 1, f"PDPT entry for {linear:#x} not present"
    pde = u64(read((pdpte & 0x000FFFFFFFFFF000) + 8 * ((linear >> 21) & 511), 8), 0)
    assert pde & 1, f"PD entry for {linear:#x} not present"
    assert not pde & 0x80, "MLE page tables use 4 KiB pages only"
    pte = u64(read((pde & 0x000FFFFFFFFFF000) + 8 * ((linear >> 12) & 511), 8), 0)
    assert pte & 1, f"PT entry for {linear:#x} not present"
    return (pte & 0x000FFFFFFFFFF000) | (linear & 0xFFF)


@dataclass(frozen=True)
class VariableMtrr:
    """IA32_MTRR_PHYSBASEn (type bits 7:0, base bits MAXPHYADDR-1:12) and PHYSMASKn
    (valid bit 11, mask bits MAXPHYADDR-1:12), SDM vol. 3A 12.11.2.3."""

    base: int
    mask: int

    @property
    def valid(self) -> bool:
        return bool(self.mask & (1 << 11))

    @property
    def mem_type(self) -> int:
        return self.base & 0xFF

    def covers(self, address: int, phys_bits: int = 36) -> bool:
        m = self.mask & ((1 << phys_bits) - 1) & ~0xFFF
        return self.valid and (address & m) == (self.base & m & ~0xFFF)
