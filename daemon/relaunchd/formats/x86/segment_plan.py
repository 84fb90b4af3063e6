"""The x86_64 `kexec_load` segment plan for a bzImage (formats layer: pure, no syscalls).

Given the kernel, initrd, command line, an optional SLRT and extra blobs (DL handler, SINIT
ACM, DRTM log buffer), the firmware memory map and what the firmware handed over, decide where every
segment goes and build the bytes that depend on those addresses (zero page, setup_data chain,
purgatory). `kexec.py` hands `plan.segments` to the syscall and `plan.entry` as the entry.

Placement (kexec-load-notes.md, what booted; boot.rst "THE LINUX/x86 BOOT PROTOCOL"):
  * kernel: the protected-mode part of the file, at an address aligned to kernel_alignment
    and not below pref_address (a relocatable kernel loaded lower moves itself up to
    pref_address before decompressing: boot.rst, init_size), with memsz = init_size so
    the decompressor's whole working area is ours (pitfall 2). pref_address itself when free;
  * initrd: top-down below initrd_addr_max (inclusive), above 4 GiB only as a fallback when
    the kernel sets XLF_CAN_BE_LOADED_ABOVE_4G (then through the ext_* fields);
  * zero page, command line, setup_data chain, EFI memory map and purgatory: one page-rounded
    segment each, below 4 GiB;
  * extra blobs: at a fixed address when given (e.g. TXT.SINIT.BASE), directly below the
    kernel when asked (the TXT MLE page tables, which SINIT wants adjacent to the MLE:
    tboot and GRUB place them so), else anywhere that meets their alignment and
    below-4-GiB constraint. A blob whose bytes depend on where things went (the DL
    handler's parameter block) is filled in after placement, like the SLRT.
Every placement is checked against the map by `memory_ranges` (the kernel does not,
pitfall 4).

The SLRT travels in a relaunchd setup_data node (boot_params.SETUP_RELAUNCHD_SLRT), and
`slr_table_addr` (0x078) points at its payload: the kernel reserves setup_data memory and
exposes the node in /sys/kernel/boot_params/setup_data/N/data, so the next kernel can read
the table back. Caveat: the KASLR decompressor avoids initrd, command line, zero page and
setup_data, but not the extra blobs; Secure Launch runs with `nokaslr` (drtm.md §2.6).

Payloads stay `FileRange`s (no copy of a 100 MB initrd in Python); `to_json` hashes them by
streaming through `hashing.feed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import InvalidArgument
from relaunchd.formats import hashing
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86 import boot_params as bp
from relaunchd.formats.x86.memory_ranges import (
    FOUR_GIB,
    PAGE,
    Allocator,
    MemoryMap,
    NoRoom,
    Placement,
    check_placements,
)
from relaunchd.formats.x86.purgatory import build_purgatory, kernel_entry

Source = bytes | FileRange
KEXEC_SEGMENT_MAX = 16       # include/linux/kexec.h

# Segment names (also the keys of the address map an SLRT builder receives).
KERNEL = "kernel"
INITRD = "initrd"
ZERO_PAGE = "zero-page"
CMDLINE = "cmdline"
SETUP_DATA = "setup-data"
PURGATORY = "purgatory"
EFI_MEMMAP = "efi-memmap"
SLRT = "slrt"                # inside SETUP_DATA: not a segment of its own


def _size(data: Source) -> int:
    return data.length if isinstance(data, FileRange) else len(data)


def _page(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class Segment:
    """One kexec segment: `data` copied to physical `address`, zero-filled up to `memsz`."""

    name: str
    address: int
    memsz: int
    data: Source

    @property
    def bufsz(self) -> int:
        return _size(self.data)

    @property
    def end(self) -> int:
        return self.address + self.memsz


@dataclass(frozen=True)
class SegmentRequest:
    """An extra segment (DL handler, SINIT ACM, DRTM log buffer) and its constraints."""

    name: str
    data: Source
    memsz: int = 0               # 0: the data's size; a log buffer gives its full size
    align: int = PAGE
    below_4g: bool = True
    address: int | None = None   # fixed physical address (e.g. TXT.SINIT.BASE), else placed
    reserve: bool = False        # hand it to the next kernel as e820 "Reserved"
    below_kernel: bool = False   # end exactly where the kernel segment starts
    # Bytes that depend on the addresses ({segment name: (address, memsz)}, "slrt" and
    # "slrt-table" included), called after placement; must return len(data) bytes.
    fill: Callable[[Mapping[str, tuple[int, int]]], bytes] | None = None


@dataclass(frozen=True)
class EfiBoot:
    """What a UEFI-booted system passes on (zero-page.rst efi_info; kexec-tools does the same
    from /sys/firmware/efi): the planner places `memmap` and fills in its address."""

    systab: int
    memdesc_size: int
    memdesc_version: int
    memmap: bytes                         # EFI memory descriptors for the next kernel
    setup_efi: bytes | None = None        # payload of a SETUP_EFI node (struct efi_setup_data)


@dataclass(frozen=True)
class FirmwareInfo:
    acpi_rsdp: int = 0           # 0: the decompressor finds it itself on a BIOS boot
    efi: EfiBoot | None = None


@dataclass(frozen=True)
class SlrtBuilder:
    """An SLRT whose bytes depend on where things went (DL_INFO, LOG_INFO addresses).

    `build` gets {segment name: (address, memsz)} including "slrt" itself and must return at
    most `size` bytes.
    """

    size: int
    build: Callable[[Mapping[str, tuple[int, int]]], bytes]


@dataclass(frozen=True)
class SegmentPlan:
    header: bp.SetupHeader
    segments: tuple[Segment, ...]
    entry: int                           # purgatory address: the kexec entry point
    kernel_entry: int                    # load address + 0x200
    zero_page: bytes
    zero_page_address: int
    slrt_address: int | None             # value written at 0x078
    e820: tuple[bp.E820Entry, ...] = field(default=())

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """For `plan.json`: every segment's address, sizes and the sha256 of its data."""
        digests = _sha256_all(self.segments)
        v = self.header.version
        return {
            "boot_protocol": f"{v >> 8}.{v & 0xff:02d}",
            "entry": self.entry,
            "kernel_entry": self.kernel_entry,
            "zero_page": self.zero_page_address,
            "slr_table_addr": self.slrt_address,
            "segments": [
                {
                    "name": seg.name,
                    "address": seg.address,
                    "memsz": seg.memsz,
                    "bufsz": seg.bufsz,
                    "range": f"0x{seg.address:x}-0x{seg.end - 1:x}",
                    "sha256": digests[i],
                }
                for i, seg in enumerate(self.segments)
            ],
            "e820": [{"addr": e.addr, "size": e.size, "type": e.type} for e in self.e820],
        }


def _sha256_all(segments: Sequence[Segment]) -> list[str]:
    """sha256 of each segment's data; file ranges of one descriptor in one streaming pass."""
    hashers = [hashlib.sha256() for _ in segments]
    by_fd: dict[int, list[tuple[int, FileRange]]] = {}
    for i, seg in enumerate(segments):
        if isinstance(seg.data, FileRange):
            by_fd.setdefault(seg.data.fd, []).append((i, seg.data))
        else:
            hashers[i].update(seg.data)
    for fd, items in by_fd.items():
        sinks = [hashing.Sink(hashers[i], [(r.offset, r.length)]) for i, r in items]
        hashing.feed(fd, sinks)
    return [h.hexdigest() for h in hashers]


def normalize_cmdline(cmdline: bytes, header: bp.SetupHeader) -> bytes:
    """The command line NUL-terminated, checked against cmdline_size (boot.rst: "the maximum
    size of the command line without the terminating zero")."""
    text = cmdline[:-1] if cmdline.endswith(b"\0") else cmdline
    if b"\0" in text:
        raise InvalidArgument("command line contains a NUL byte")
    if len(text) > header.cmdline_size:
        raise InvalidArgument(
            f"command line is {len(text)} bytes; this kernel takes at most {header.cmdline_size}")
    return text + b"\0"


def plan_segments(kernel: FileRange, *, cmdline: bytes, memmap: MemoryMap,
                  initrd: Source | None = None,
                  slrt: bytes | SlrtBuilder | None = None,
                  extras: Sequence[SegmentRequest] = (),
                  firmware: FirmwareInfo | None = None,
                  cli: bool = True, kernel_below_4g: bool = False,
                  ceiling: int = FOUR_GIB) -> SegmentPlan:
    """Place everything and build the zero page; raises InvalidKernel, InvalidArgument or
    NoRoom naming what does not work. `kernel_below_4g`: a TXT MLE must lie
    below 4 GiB whatever the kernel allows (its page tables are 32-bit). `ceiling`
    lowers "below 4 GiB" for everything, the initrd included (TXT: the low PMR)."""
    firmware = firmware or FirmwareInfo()
    header = bp.parse_setup_header(kernel)
    cmdline = normalize_cmdline(cmdline, header)
    names = [KERNEL, INITRD, ZERO_PAGE, CMDLINE, SETUP_DATA, PURGATORY, EFI_MEMMAP, SLRT]
    seen = set(names)
    for blob in extras:
        if blob.name in seen:
            raise InvalidArgument(f"segment name {blob.name!r} is used twice")
        seen.add(blob.name)
    alloc = Allocator(memmap)
    low = min(FOUR_GIB, ceiling)

    # 1. Fixed-address blobs first: they cannot move, everything else can.
    placed: dict[str, Placement] = {}
    for blob in extras:
        if blob.address is not None:
            size = max(blob.memsz, _size(blob.data))
            if blob.address % max(blob.align, PAGE):
                raise InvalidArgument(f"{blob.name} address 0x{blob.address:x} is not aligned")
            if blob.below_4g and blob.address + size > low:
                raise InvalidArgument(f"{blob.name} at 0x{blob.address:x} is not below 4 GiB")
            placed[blob.name] = alloc.claim(blob.name, blob.address, size)

    # 2. The kernel, covering init_size from an aligned base (pitfall 2).
    kernel_size = _page(max(header.init_size, header.kernel_size))
    kernel_max = None if header.above_4g and not kernel_below_4g else low
    if header.relocatable:
        placed[KERNEL] = alloc.place(
            KERNEL, kernel_size, align=header.kernel_alignment, min_addr=header.pref_address,
            max_addr=kernel_max, prefer=header.pref_address)
    else:
        placed[KERNEL] = alloc.claim(KERNEL, header.pref_address, kernel_size)

    # 3. Floating blobs; those that must sit right below the kernel first.
    for blob in extras:
        if blob.address is None and blob.below_kernel:
            size = _page(max(blob.memsz, _size(blob.data)))
            placed[blob.name] = alloc.claim(blob.name, placed[KERNEL].addr - size, size)
    for blob in extras:
        if blob.address is None and not blob.below_kernel:
            placed[blob.name] = alloc.place(
                blob.name, max(blob.memsz, _size(blob.data)), align=blob.align,
                max_addr=low if blob.below_4g else None)

    # 4. The e820 table for the next kernel: the firmware map, reserved blobs carved out.
    e820 = list(memmap.entries)
    for blob in extras:
        if blob.reserve:
            p = placed[blob.name]
            e820 = bp.mark_e820(e820, p.addr, p.size)
    in_page, overflow = e820[:bp.E820_MAX_ENTRIES_ZEROPAGE], e820[bp.E820_MAX_ENTRIES_ZEROPAGE:]

    # 5. setup_data: SLRT node first (so slr_table_addr = head + 16), SETUP_EFI, E820_EXT.
    slrt_size = 0 if slrt is None else slrt.size if isinstance(slrt, SlrtBuilder) else len(slrt)
    nodes: list[bp.SetupDataNode] = []
    if slrt is not None:
        nodes.append(bp.SetupDataNode(bp.SETUP_RELAUNCHD_SLRT, bytes(slrt_size)))
    efi = firmware.efi
    if efi is not None and efi.setup_efi is not None:
        nodes.append(bp.SetupDataNode(bp.SETUP_EFI, efi.setup_efi))
    if overflow:
        nodes.append(bp.e820_ext_node(overflow))

    # 6. The small pages, below 4 GiB (boot.rst: all of them are 32-bit pointers unless the
    #    ext_ fields are used; the purgatory runs on relocate_kernel's identity map).
    placed[ZERO_PAGE] = alloc.place(ZERO_PAGE, bp.ZERO_PAGE_SIZE, max_addr=low)
    placed[CMDLINE] = alloc.place(CMDLINE, len(cmdline), max_addr=low)
    if nodes:
        placed[SETUP_DATA] = alloc.place(SETUP_DATA, bp.setup_data_size(nodes), max_addr=low)
    if efi is not None:
        placed[EFI_MEMMAP] = alloc.place(EFI_MEMMAP, max(len(efi.memmap), 1), max_addr=low)
    placed[PURGATORY] = alloc.place(PURGATORY, PAGE, max_addr=low)

    # 7. The initrd last and top-down: it is the largest and the most flexible.
    initrd_size = 0 if initrd is None else _size(initrd)
    if initrd_size:
        try:
            placed[INITRD] = alloc.place(INITRD, initrd_size,
                                         max_addr=min(header.initrd_addr_max + 1, low),
                                         top_down=True)
        except NoRoom:
            if not header.above_4g or ceiling < FOUR_GIB:
                raise
            placed[INITRD] = alloc.place(INITRD, initrd_size, top_down=True)

    check_placements(memmap, list(placed.values()))

    # 8. Bytes that depend on addresses.
    addresses = {name: (p.addr, p.size) for name, p in placed.items()}
    slrt_addr: int | None = None
    setup_bytes = b""
    if nodes:
        base = placed[SETUP_DATA].addr
        if slrt is not None:
            slrt_addr = base + bp.SETUP_DATA_HEADER.size
            addresses[SLRT] = (slrt_addr, slrt_size)
            data = slrt.build(addresses) if isinstance(slrt, SlrtBuilder) else slrt
            if len(data) > slrt_size:
                raise InvalidArgument(
                    f"SLRT builder returned {len(data)} bytes, more than the {slrt_size} planned")
            nodes[0] = bp.SetupDataNode(bp.SETUP_RELAUNCHD_SLRT,
                                        data + bytes(slrt_size - len(data)))
        setup_bytes, _ = bp.build_setup_data(nodes, base)
    filled: dict[str, Source] = {}
    for blob in extras:
        if blob.fill is not None:
            data = blob.fill(addresses)
            if len(data) != _size(blob.data):
                raise InvalidArgument(f"{blob.name}: filled in {len(data)} bytes, "
                                      f"{_size(blob.data)} were planned")
            filled[blob.name] = data
    efi_info = None
    if efi is not None:
        efi_info = bp.EfiInfo(systab=efi.systab, memmap=placed[EFI_MEMMAP].addr,
                              memmap_size=len(efi.memmap), memdesc_size=efi.memdesc_size,
                              memdesc_version=efi.memdesc_version)
    ramdisk = placed.get(INITRD)
    zero_page = bp.build_zero_page(
        header, cmd_line_ptr=placed[CMDLINE].addr, e820=in_page,
        ramdisk_image=ramdisk.addr if ramdisk else 0, ramdisk_size=initrd_size,
        setup_data=placed[SETUP_DATA].addr if nodes else 0,
        acpi_rsdp_addr=firmware.acpi_rsdp, slr_table_addr=slrt_addr or 0, efi=efi_info)
    entry64 = kernel_entry(placed[KERNEL].addr)
    purgatory = build_purgatory(placed[ZERO_PAGE].addr, entry64, cli=cli)

    segments = [Segment(KERNEL, placed[KERNEL].addr, placed[KERNEL].size,
                        header.protected_mode(kernel))]
    if ramdisk and initrd is not None:
        segments.append(Segment(INITRD, ramdisk.addr, ramdisk.size, initrd))
    segments.append(Segment(ZERO_PAGE, placed[ZERO_PAGE].addr, PAGE, zero_page))
    segments.append(Segment(CMDLINE, placed[CMDLINE].addr, placed[CMDLINE].size, cmdline))
    if nodes:
        segments.append(Segment(SETUP_DATA, placed[SETUP_DATA].addr, placed[SETUP_DATA].size,
                                setup_bytes))
    if efi is not None:
        segments.append(Segment(EFI_MEMMAP, placed[EFI_MEMMAP].addr, placed[EFI_MEMMAP].size,
                                efi.memmap))
    segments.append(Segment(PURGATORY, placed[PURGATORY].addr, PAGE, purgatory))
    for blob in extras:
        p = placed[blob.name]
        segments.append(Segment(blob.name, p.addr, p.size, filled.get(blob.name, blob.data)))
    if len(segments) > KEXEC_SEGMENT_MAX:
        raise InvalidArgument(
            f"{len(segments)} segments; kexec_load takes at most {KEXEC_SEGMENT_MAX}")
    return SegmentPlan(
        header=header, segments=tuple(segments), entry=placed[PURGATORY].addr,
        kernel_entry=entry64, zero_page=zero_page, zero_page_address=placed[ZERO_PAGE].addr,
        slrt_address=slrt_addr, e820=tuple(e820))
