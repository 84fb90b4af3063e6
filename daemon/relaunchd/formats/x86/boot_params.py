"""The x86 boot protocol as plain data: bzImage setup header, zero page, setup_data, e820
(formats layer).

References (Linux source tree):
  * Documentation/arch/x86/boot.rst, "THE LINUX/x86 BOOT PROTOCOL": the setup header,
    its offsets and which fields a boot loader reads, writes or must leave alone;
  * Documentation/arch/x86/zero-page.rst: the layout of `struct boot_params`;
  * arch/x86/include/uapi/asm/bootparam.h: flag bits, `struct setup_data`, SETUP_* types.

Why we build the zero page ourselves (kexec-load-notes.md): `kexec_file_load` builds it
in-kernel with no way to set `slr_table_addr` (0x078), so the Secure Launch path uses
`kexec_load` with our own page. The verified rules are encoded here: start from zeros, copy only
the setup header (0x1f1 up to the end the jump at 0x200 gives), keep the sentinel at 0x1ef zero
(otherwise `sanitize_boot_params` wipes 0x078).

Nothing here does I/O beyond `FileRange.pread` of the kernel's first sectors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument, InvalidKernel
from relaunchd.formats.pe import FileRange

ZERO_PAGE_SIZE = 4096

# --- setup header (boot.rst, "THE REAL-MODE KERNEL HEADER"); offsets are into the zero page,
# which is also where they sit in the bzImage's first sectors.
HDR_START = 0x1F1            # setup_sects: first byte of struct setup_header
HDR_MAGIC = b"HdrS"          # at 0x202, protocol 2.00+
MIN_VERSION = 0x020C         # 2.12: xloadflags; also pref_address/init_size (2.10)
BOOT_FLAG = 0xAA55           # at 0x1fe
JUMP_OPCODE = 0xEB           # 0x200: `jmp short`; its rel8 at 0x201 ends the header (0x202+rel8)
HDR_LIMIT = 0x290            # zero-page.rst: edd_mbr_sig_buffer follows the header at 0x290

# loadflags (0x211), bootparam.h
LOADED_HIGH = 1 << 0         # protected-mode code at 0x100000+ (every bzImage)
KASLR_FLAG = 1 << 1          # set by the decompressor itself, never by a loader
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6       # obsolete since 2.07-era 32-bit entry
CAN_USE_HEAP = 1 << 7        # heap_end_ptr valid: only for the 16-bit setup code

# xloadflags (0x236), bootparam.h
XLF_KERNEL_64 = 1 << 0                # has the 64-bit entry at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1   # kernel/initrd/cmdline/zero page may live above 4 GiB
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

TYPE_OF_LOADER_UNDEFINED = 0xFF       # boot.rst: "0xFF: no assigned ID"
ENTRY_64_OFFSET = 0x200               # boot.rst "64-bit BOOT PROTOCOL": entry = load addr + 0x200

# --- zero page fields we write (zero-page.rst)
OFF_ACPI_RSDP = 0x070        # u64 acpi_rsdp_addr
OFF_SLR_TABLE = 0x078        # u64 slr_table_addr (Secure Launch v16; `_pad3` upstream)
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_EFI_INFO = 0x1C0         # struct efi_info, 32 bytes
OFF_E820_ENTRIES = 0x1E8     # u8
OFF_SENTINEL = 0x1EF         # must be 0 or the kernel clears "unknown" fields
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_SETUP_DATA = 0x250       # u64 head of the setup_data list
OFF_E820_TABLE = 0x2D0       # struct boot_e820_entry[128], 20 bytes each
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")   # addr, size, type: packed, 20 bytes

EFI64_LOADER_SIGNATURE = b"EL64"

# --- e820 types (arch/x86/include/asm/e820/types.h)
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_PRAM = 12               # "Persistent Memory (legacy)"
E820_SOFT_RESERVED = 0xEFFFFFFF

# --- setup_data (bootparam.h): struct setup_data { u64 next; u32 type; u32 len; u8 data[]; }
SETUP_DATA_HEADER = struct.Struct("<QII")
SETUP_NONE = 0
SETUP_E820_EXT = 1
SETUP_DTB = 2
SETUP_PCI = 3
SETUP_EFI = 4
SETUP_RNG_SEED = 9
SETUP_INDIRECT = 1 << 31
# relaunchd's own node carrying the SLRT bytes, so the next kernel shows them in
# /sys/kernel/boot_params/setup_data/N/{type,data} (arch/x86/kernel/ksysfs.c). The kernel's
# parse_setup_data() ignores types it does not know, but still reserves every node
# (memblock_x86_reserve_range_setup_data, e820__reserve_setup_data) and KASLR avoids them.
# Chosen far above the kernel's enum (SETUP_ENUM_MAX is 9 in 6.1, a handful more since) so
# a future SETUP_* cannot collide, and with bit 31 clear so it is never read as
# SETUP_INDIRECT. "RL" in the high half: 0x524c0001.
SETUP_RELAUNCHD_SLRT = 0x524C0001
SETUP_DATA_ALIGN = 8         # nodes start 8-aligned: `next` is a u64


@dataclass(frozen=True)
class SetupHeader:
    """The facts of a bzImage setup header a 64-bit loader needs (boot.rst field table)."""

    version: int                 # 0x206, e.g. 0x020f
    setup_sects: int             # 0x1f1, with the "0 means 4" rule applied
    loadflags: int               # 0x211 as in the file
    relocatable: bool            # 0x234 relocatable_kernel
    kernel_alignment: int        # 0x230
    min_alignment_log2: int      # 0x235
    pref_address: int            # 0x258
    init_size: int               # 0x260: bytes needed from the (aligned) load address
    xloadflags: int              # 0x236
    cmdline_size: int            # 0x238: max command line length without the NUL
    initrd_addr_max: int         # 0x22c: highest address the initrd may occupy (inclusive)
    syssize: int                 # 0x1f4, 16-byte paragraphs of protected-mode code
    raw: bytes                   # the header as in the file, 0x1f1 .. header end
    image_size: int              # length of the whole bzImage file range

    @property
    def header_end(self) -> int:
        return HDR_START + len(self.raw)

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel: (setup_sects + 1) * 512 (boot.rst)."""
        return (self.setup_sects + 1) * 512

    @property
    def kernel_size(self) -> int:
        """Bytes of the file from the protected-mode part to its end (what kexec loads)."""
        return self.image_size - self.kernel_offset

    @property
    def kernel_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    def protected_mode(self, image: FileRange) -> FileRange:
        """The protected-mode part of `image` as a file range (no copy)."""
        return image.sub(self.kernel_offset, self.kernel_size)


def parse_setup_header(image: FileRange) -> SetupHeader:
    """Parse and check the setup header of a bzImage in `image`; InvalidKernel names the flaw.

    Requires what a 64-bit `kexec_load` boot relies on: protocol >= 2.12 (as
    arch/x86/kernel/kexec-bzimage64.c's probe), a bzImage (LOADED_HIGH), the 64-bit entry
    (XLF_KERNEL_64), a power-of-two kernel_alignment and a non-zero init_size.
    """
    if image.length < HDR_LIMIT:
        raise InvalidKernel(f"too small to be a bzImage ({image.length} bytes)")
    head = image.pread(0, HDR_LIMIT)
    if head[0x202:0x206] != HDR_MAGIC:
        raise InvalidKernel("not a bzImage (no 'HdrS' at 0x202)")
    version, = struct.unpack_from("<H", head, 0x206)
    if version < MIN_VERSION:
        raise InvalidKernel(
            f"boot protocol {version >> 8}.{version & 0xff:02d} is older than 2.12")
    boot_flag, = struct.unpack_from("<H", head, 0x1FE)
    if boot_flag != BOOT_FLAG:
        raise InvalidKernel(f"boot_flag is 0x{boot_flag:04x}, not 0xaa55")
    if head[0x200] != JUMP_OPCODE:
        raise InvalidKernel(f"no short jump at 0x200 (0x{head[0x200]:02x})")
    end = 0x202 + head[0x201]
    if end > HDR_LIMIT or end < 0x26C:
        # 0x26c: the header of protocol 2.12+ reaches at least init_size/handover_offset.
        raise InvalidKernel(f"setup header ends at 0x{end:x}, outside 0x26c..0x{HDR_LIMIT:x}")
    setup_sects = head[0x1F1] or 4   # boot.rst: "If this field is 0, the real value is 4."
    syssize, = struct.unpack_from("<I", head, 0x1F4)
    (initrd_addr_max, kernel_alignment, relocatable, min_alignment, xloadflags,
     cmdline_size) = struct.unpack_from("<IIBBHI", head, 0x22C)
    pref_address, init_size = struct.unpack_from("<QI", head, 0x258)
    loadflags = head[0x211]
    header = SetupHeader(
        version=version, setup_sects=setup_sects, loadflags=loadflags,
        relocatable=bool(relocatable), kernel_alignment=kernel_alignment,
        min_alignment_log2=min_alignment, pref_address=pref_address, init_size=init_size,
        xloadflags=xloadflags, cmdline_size=cmdline_size, initrd_addr_max=initrd_addr_max,
        syssize=syssize, raw=bytes(head[HDR_START:end]), image_size=image.length)
    if not loadflags & LOADED_HIGH:
        raise InvalidKernel("not a bzImage (LOADED_HIGH clear: a zImage loads at 0x10000)")
    if not header.kernel_64:
        raise InvalidKernel("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1):
        raise InvalidKernel(f"kernel_alignment 0x{kernel_alignment:x} is not a power of two")
    if init_size == 0:
        raise InvalidKernel("init_size is 0")
    if header.kernel_offset >= image.length:
        raise InvalidKernel(
            f"protected-mode kernel offset 0x{header.kernel_offset:x} is beyond the file")
    if header.kernel_size < syssize * 16:
        raise InvalidKernel(
            f"truncated: protected-mode part has {header.kernel_size} bytes, "
            f"syssize says {syssize * 16}")
    if init_size < syssize * 16:
        raise InvalidKernel("init_size is smaller than the compressed kernel it describes")
    return header


@dataclass(frozen=True)
class E820Entry:
    """One e820 range: [addr, addr + size) of `type`."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)


def pack_e820(entries: Sequence[E820Entry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def unpack_e820(data: bytes) -> list[E820Entry]:
    if len(data) % E820_ENTRY.size:
        raise InvalidArgument(f"e820 table of {len(data)} bytes is not a multiple of 20")
    return [E820Entry(*E820_ENTRY.unpack_from(data, i))
            for i in range(0, len(data), E820_ENTRY.size)]


def mark_e820(entries: Sequence[E820Entry], addr: int, size: int,
              type_: int = E820_RESERVED) -> list[E820Entry]:
    """`entries` (sorted, non-overlapping) with [addr, addr+size) retyped as `type_`.

    Used to hand the next kernel a map where loader-owned blobs (a DRTM log buffer) are not
    "System RAM", so it does not reuse them before its own code reserves them.
    """
    out: list[E820Entry] = []
    end = addr + size
    for e in entries:
        if e.end <= addr or e.addr >= end:
            out.append(e)
            continue
        if e.addr < addr:
            out.append(E820Entry(e.addr, addr - e.addr, e.type))
        lo, hi = max(e.addr, addr), min(e.end, end)
        out.append(E820Entry(lo, hi - lo, type_))
        if e.end > end:
            out.append(E820Entry(end, e.end - end, e.type))
    # Merge neighbours of the same type so repeated marks do not inflate the table.
    merged: list[E820Entry] = []
    for e in out:
        if merged and merged[-1].end == e.addr and merged[-1].type == e.type:
            merged[-1] = E820Entry(merged[-1].addr, merged[-1].size + e.size, e.type)
        else:
            merged.append(e)
    return merged


# --------------------------------------------------------------------------- setup_data


@dataclass(frozen=True)
class SetupDataNode:
    type: int
    data: bytes


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def setup_data_size(nodes: Sequence[SetupDataNode]) -> int:
    """Bytes `build_setup_data` needs for `nodes` (so the chain can be placed first)."""
    return sum(_align(SETUP_DATA_HEADER.size + len(n.data), SETUP_DATA_ALIGN) for n in nodes)


def build_setup_data(nodes: Sequence[SetupDataNode], base: int) -> tuple[bytes, tuple[int, ...]]:
    """The chain of `nodes` laid out from physical address `base` (8-aligned).

    Returns the bytes and each node's physical address; the first address goes into
    boot_params.hdr.setup_data (0x250), each node's `next` points at the following one and the
    last one's is 0 (boot.rst, "setup_data").
    """
    if base % SETUP_DATA_ALIGN or base <= 0:
        # 0 would read as "end of list" in boot_params.hdr.setup_data and every `next`.
        raise InvalidArgument(
            f"setup_data base 0x{base:x} is not a non-zero 8-byte aligned address")
    addresses: list[int] = []
    offset = 0
    for node in nodes:
        if not 0 <= node.type < 1 << 32 or node.type & SETUP_INDIRECT:
            raise InvalidArgument(f"setup_data type 0x{node.type:x} is not a direct type")
        if len(node.data) >= 1 << 32:
            raise InvalidArgument("setup_data payload larger than 4 GiB")
        addresses.append(base + offset)
        offset += _align(SETUP_DATA_HEADER.size + len(node.data), SETUP_DATA_ALIGN)
    out = bytearray(offset)
    for i, node in enumerate(nodes):
        at = addresses[i] - base
        nxt = addresses[i + 1] if i + 1 < len(nodes) else 0
        SETUP_DATA_HEADER.pack_into(out, at, nxt, node.type, len(node.data))
        out[at + SETUP_DATA_HEADER.size:at + SETUP_DATA_HEADER.size + len(node.data)] = node.data
    return bytes(out), tuple(addresses)


def parse_setup_data(blob: bytes, base: int, head: int) -> list[SetupDataNode]:
    """Walk a chain starting at physical `head` inside `blob` (which sits at `base`).

    Bounds- and loop-checked: every node must lie inside `blob`; a pointer outside it or a
    revisited node is an error (the chain is ours, so it must be self-contained).
    """
    nodes: list[SetupDataNode] = []
    seen: set[int] = set()
    at = head
    while at:
        rel = at - base
        if at in seen:
            raise InvalidArgument(f"setup_data chain loops at 0x{at:x}")
        seen.add(at)
        if rel < 0 or rel + SETUP_DATA_HEADER.size > len(blob):
            raise InvalidArgument(f"setup_data node 0x{at:x} is outside the chain's bytes")
        nxt, type_, length = SETUP_DATA_HEADER.unpack_from(blob, rel)
        start = rel + SETUP_DATA_HEADER.size
        if start + length > len(blob):
            raise InvalidArgument(f"setup_data node 0x{at:x} payload runs past the chain")
        nodes.append(SetupDataNode(type_, bytes(blob[start:start + length])))
        at = nxt
    return nodes


def e820_ext_node(entries: Sequence[E820Entry]) -> SetupDataNode:
    """The SETUP_E820_EXT node for entries beyond the zero page's 128 (the kernel's
    e820__memory_setup_extended takes len / 20 entries from it)."""
    return SetupDataNode(SETUP_E820_EXT, pack_e820(entries))


# --------------------------------------------------------------------------- zero page


@dataclass(frozen=True)
class EfiInfo:
    """`struct efi_info` (zero-page.rst 0x1c0) for a UEFI-booted system: physical addresses."""

    systab: int
    memmap: int                  # physical address of the EFI memory descriptors
    memmap_size: int
    memdesc_size: int
    memdesc_version: int

    def pack(self) -> bytes:
        # efi_loader_signature, efi_systab, efi_memdesc_size, efi_memdesc_version,
        # efi_memmap, efi_memmap_size, efi_systab_hi, efi_memmap_hi (bootparam.h order)
        return struct.pack(
            "<4sIIIIIII", EFI64_LOADER_SIGNATURE, self.systab & 0xFFFFFFFF,
            self.memdesc_size, self.memdesc_version, self.memmap & 0xFFFFFFFF,
            self.memmap_size, self.systab >> 32, self.memmap >> 32)


def build_zero_page(header: SetupHeader, *, cmd_line_ptr: int,
                    e820: Sequence[E820Entry],
                    ramdisk_image: int = 0, ramdisk_size: int = 0,
                    setup_data: int = 0, acpi_rsdp_addr: int = 0,
                    slr_table_addr: int = 0, efi: EfiInfo | None = None,
                    quiet: bool = False) -> bytes:
    """The 4096-byte `struct boot_params` for a 64-bit entry (boot.rst "64-bit BOOT PROTOCOL").

    Built from zeros with only the setup header copied, so the sentinel (0x1ef) stays 0 and
    the kernel keeps every field we set (kexec-load-notes.md pitfall 1). At most 128 e820
    entries fit; pass the rest as a SETUP_E820_EXT node (`e820_ext_node`).
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise InvalidArgument(
            f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}, "
            "pass the rest in a SETUP_E820_EXT node")
    for name, value in (("cmd_line_ptr", cmd_line_ptr), ("ramdisk_image", ramdisk_image),
                        ("ramdisk_size", ramdisk_size)):
        if not 0 <= value < 1 << 64:
            raise InvalidArgument(f"{name} 0x{value:x} out of range")
    if not header.above_4g and max(cmd_line_ptr, ramdisk_image + ramdisk_size) > 1 << 32:
        raise InvalidArgument("kernel cannot take a command line or initrd above 4 GiB")
    page = bytearray(ZERO_PAGE_SIZE)
    page[HDR_START:header.header_end] = header.raw
    page[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    # LOADED_HIGH only: CAN_USE_HEAP/heap_end_ptr concern the 16-bit setup code we skip,
    # KEEP_SEGMENTS is obsolete and KASLR_FLAG is the decompressor's own output.
    page[OFF_LOADFLAGS] = LOADED_HIGH | (QUIET_FLAG if quiet else 0)
    struct.pack_into("<II", page, OFF_RAMDISK_IMAGE, ramdisk_image & 0xFFFFFFFF,
                     ramdisk_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, OFF_CMD_LINE_PTR, cmd_line_ptr & 0xFFFFFFFF)
    # The ext_* fields carry bits 32..63 (zero-page.rst 0x0c0..0x0cb).
    struct.pack_into("<III", page, OFF_EXT_RAMDISK_IMAGE, ramdisk_image >> 32,
                     ramdisk_size >> 32, cmd_line_ptr >> 32)
    struct.pack_into("<Q", page, OFF_SETUP_DATA, setup_data)
    struct.pack_into("<Q", page, OFF_ACPI_RSDP, acpi_rsdp_addr)
    struct.pack_into("<Q", page, OFF_SLR_TABLE, slr_table_addr)
    page[OFF_E820_ENTRIES] = len(e820)
    table = pack_e820(e820)
    page[OFF_E820_TABLE:OFF_E820_TABLE + len(table)] = table
    if efi is not None:
        page[OFF_EFI_INFO:OFF_EFI_INFO + 32] = efi.pack()
    page[OFF_SENTINEL] = 0
    return bytes(page)
