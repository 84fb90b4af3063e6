"""The firmware memory map as values, and a placement allocator for kexec segments
(formats layer, pure; `platform.memory_map` reads the map from sysfs).

`/sys/firmware/memmap/N/{start,end,type}` is the map the firmware handed the running kernel
(drivers/firmware/memmap.c), before the kernel's own reservations: what the next kernel should
be told, and where a loader may put segments. Facts from kexec-load-notes.md pitfall 3: `end` is
inclusive, the directories are not in address order, and the type strings are the kernel's
e820_type_to_string() names.

The allocator exists because the kernel does not check placement (pitfall 4): `kexec_load`
accepts segments in the VGA hole, across reserved ranges and where no RAM exists; only overlaps
between segments are refused. Every segment therefore goes through here: inside "System RAM"
only, clear of every non-RAM entry (maps can overlap; non-RAM wins), above the first 1 MiB
(BIOS data, EBDA, real-mode trampoline), page-granular as `kexec_load` requires
(kernel/kexec_core.c sanity_check_segment_list), never overlapping another segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument, NoRoom
from relaunchd.formats.x86.boot_params import (
    E820_ACPI,
    E820_NVS,
    E820_PMEM,
    E820_PRAM,
    E820_RAM,
    E820_RESERVED,
    E820_SOFT_RESERVED,
    E820_UNUSABLE,
    E820Entry,
)

PAGE = 4096
LOW_MEMORY = 1 << 20
FOUR_GIB = 1 << 32

# arch/x86/kernel/e820.c e820_type_to_string(); E820_TYPE_RESERVED_KERN also prints
# "System RAM" but never reaches the firmware map.
TYPE_BY_NAME: Mapping[str, int] = {
    "System RAM": E820_RAM,
    "Reserved": E820_RESERVED,
    "ACPI Tables": E820_ACPI,
    "ACPI Non-volatile Storage": E820_NVS,
    "Unusable memory": E820_UNUSABLE,
    "Persistent Memory": E820_PMEM,
    "Persistent Memory (legacy)": E820_PRAM,
    "Soft Reserved": E820_SOFT_RESERVED,
}
# "Unknown E820 type" (or anything new) is passed on as reserved: never RAM to us.
UNKNOWN_TYPE = E820_RESERVED


@dataclass(frozen=True)
class MemoryMap:
    """Firmware map entries in address order (overlaps, if firmware has them, kept)."""

    entries: tuple[E820Entry, ...]

    def ram(self) -> list[tuple[int, int]]:
        """Usable [start, end) ranges: RAM merged, minus every non-RAM entry."""
        ram = _merge((e.addr, e.end) for e in self.entries if e.type == E820_RAM)
        holes = _merge((e.addr, e.end) for e in self.entries if e.type != E820_RAM)
        return _subtract(ram, holes)


def parse_memmap(raw: Mapping[str, Mapping[str, str]]) -> MemoryMap:
    """Pure parser: {dir name: {"start": "0x0", "end": "0x9fbff", "type": "System RAM"}}."""
    entries = []
    for name, attrs in raw.items():
        try:
            start = int(attrs["start"].strip(), 0)
            end = int(attrs["end"].strip(), 0)
            kind = attrs["type"].strip()
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"memmap entry {name}: unreadable ({exc})") from None
        if end < start:
            raise InvalidArgument(f"memmap entry {name}: end 0x{end:x} < start 0x{start:x}")
        # `end` is inclusive (drivers/firmware/memmap.c prints entry->end = start + size - 1).
        entries.append(E820Entry(start, end - start + 1, TYPE_BY_NAME.get(kind, UNKNOWN_TYPE)))
    entries.sort(key=lambda e: (e.addr, e.size))
    return MemoryMap(tuple(entries))


# --------------------------------------------------------------------------- allocator


@dataclass(frozen=True)
class Placement:
    name: str
    addr: int
    size: int        # page-rounded

    @property
    def end(self) -> int:
        return self.addr + self.size


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for ha, hb in holes:
            nxt = []
            for pa, pb in pieces:
                if hb <= pa or ha >= pb:
                    nxt.append((pa, pb))
                    continue
                if pa < ha:
                    nxt.append((pa, ha))
                if hb < pb:
                    nxt.append((hb, pb))
            pieces = nxt
        out.extend(pieces)
    return sorted(out)


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


class Allocator:
    """Places page-granular segments in free RAM of a `MemoryMap`, one after another."""

    def __init__(self, memmap: MemoryMap, *, floor: int = LOW_MEMORY) -> None:
        self.memmap = memmap
        self.floor = floor
        self._free = _subtract(memmap.ram(), [(0, floor)])
        self._placed: list[Placement] = []

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(self._placed)

    def place(self, name: str, size: int, *, align: int = PAGE, min_addr: int = 0,
              max_addr: int | None = None, prefer: int | None = None,
              top_down: bool = False) -> Placement:
        """Find room for `size` bytes aligned to `align` inside [min_addr, max_addr).

        `prefer` is tried first, rounded *up* to `align` (a misaligned preferred address would
        make the user of the segment round up past its end, pitfall 2); otherwise the lowest
        (or, `top_down`, highest) fitting address is taken.
        """
        if size <= 0:
            raise InvalidArgument(f"segment {name}: size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise InvalidArgument(f"segment {name}: alignment 0x{align:x} not a power of two")
        align = max(align, PAGE)
        size = _align_up(size, PAGE)
        hi_limit = max_addr if max_addr is not None else 1 << 64
        candidates: list[int] = []
        if prefer is not None:
            candidates.append(_align_up(prefer, align))
        spans = [(max(a, min_addr), min(b, hi_limit)) for a, b in self._free]
        spans = [(a, b) for a, b in spans if b > a]
        for a, b in (reversed(spans) if top_down else spans):
            at = _align_down(b - size, align) if top_down else _align_up(a, align)
            if a <= at and at + size <= b:
                candidates.append(at)
                break
        for at in candidates:
            if at >= min_addr and at + size <= hi_limit and self._is_free(at, size):
                return self._take(Placement(name, at, size))
        where = f"below 0x{hi_limit:x}" if max_addr is not None else "anywhere"
        raise NoRoom(f"no room for {name} ({size} bytes, aligned 0x{align:x}, "
                     f"from 0x{min_addr:x}) {where} in free RAM")

    def claim(self, name: str, addr: int, size: int) -> Placement:
        """Take exactly [addr, addr+size) (page-granular), or raise NoRoom."""
        if addr % PAGE:
            raise InvalidArgument(f"segment {name}: address 0x{addr:x} is not page-aligned")
        size = _align_up(size, PAGE)
        if size <= 0 or not self._is_free(addr, size):
            raise NoRoom(f"{name} at 0x{addr:x}+0x{size:x} is not free RAM")
        return self._take(Placement(name, addr, size))

    def _is_free(self, at: int, size: int) -> bool:
        return any(a <= at and at + size <= b for a, b in self._free)

    def _take(self, placement: Placement) -> Placement:
        self._free = _subtract(self._free, [(placement.addr, placement.end)])
        self._placed.append(placement)
        return placement


def check_placements(memmap: MemoryMap, placements: Sequence[Placement], *,
                     floor: int = LOW_MEMORY) -> None:
    """Independent re-check of a finished layout (the kernel will not do it): each placement
    page-aligned, inside one usable RAM range, above `floor`, overlapping no other."""
    ram = memmap.ram()
    for p in placements:
        if p.addr % PAGE or p.size % PAGE or p.size <= 0:
            raise NoRoom(f"{p.name} at 0x{p.addr:x}+0x{p.size:x} is not page-granular")
        if p.addr < floor:
            raise NoRoom(f"{p.name} at 0x{p.addr:x} is below 0x{floor:x}")
        if not any(a <= p.addr and p.end <= b for a, b in ram):
            raise NoRoom(f"{p.name} at 0x{p.addr:x}..0x{p.end:x} is not inside System RAM")
    ordered = sorted(placements, key=lambda p: p.addr)
    for x, y in itertools.pairwise(ordered):
        if x.end > y.addr:
            raise NoRoom(f"{x.name} and {y.name} overlap at 0x{y.addr:x}")
