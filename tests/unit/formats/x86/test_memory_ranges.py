"""Firmware memory-map values and the segment allocator (relaunchd.formats.x86.memory_ranges),
one case per pitfall of kexec-load-notes.md, plus random maps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidArgument
from relaunchd.formats.x86 import boot_params as bp
from relaunchd.formats.x86 import memory_ranges as mm
from support.memmaps import QEMU_2G

MiB = 1 << 20
GiB = 1 << 30



def mmap(*entries: tuple[int, int, str]) -> mm.MemoryMap:
    """(start, size, type) triples, written the way sysfs would (inclusive end)."""
    return mm.parse_memmap({str(i): {"start": hex(a), "end": hex(a + n - 1), "type": t}
                            for i, (a, n, t) in enumerate(entries)})


def test_parse_qemu_map_inclusive_and_sorted():
    m = mm.parse_memmap(QEMU_2G)
    assert [(e.addr, e.size, e.type) for e in m.entries] == [
        (0x0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 0x7FEE0000, 1), (0x7FFE0000, 0x20000, 2),
        (0xFEFFC000, 0x4000, 2), (0xFFFC0000, 0x40000, 2)]
    assert m.ram() == [(0, 0x9FC00), (0x100000, 0x7FFE0000)]


def test_every_type_string():
    names = {"System RAM": 1, "Reserved": 2, "ACPI Tables": 3,
             "ACPI Non-volatile Storage": 4, "Unusable memory": 5, "Persistent Memory": 7,
             "Persistent Memory (legacy)": 12, "Soft Reserved": 0xEFFFFFFF,
             "Unknown E820 type": 2, "Something New": 2}
    m = mmap(*((i * MiB, MiB, t) for i, t in enumerate(names)))
    assert [e.type for e in m.entries] == list(names.values())
    assert m.ram() == [(0, MiB)]          # only "System RAM" is usable


def test_parse_errors():
    with pytest.raises(InvalidArgument, match="end"):
        mm.parse_memmap({"0": {"start": "0x10", "end": "0xf", "type": "System RAM"}})
    with pytest.raises(InvalidArgument, match="unreadable"):
        mm.parse_memmap({"0": {"start": "zz", "end": "0xf", "type": "System RAM"}})
    with pytest.raises(InvalidArgument, match="unreadable"):
        mm.parse_memmap({"0": {"start": "0x0", "end": "0xf"}})


# --------------------------------------------------------------------------- allocator


def test_misaligned_preferred_address_rounds_up():
    # pitfall 2: a base of 0x1100000 made the decompressor round up to 0x1200000 and run past
    # the segment. The allocator never returns a base the user would round up.
    a = mm.Allocator(mm.parse_memmap(QEMU_2G))
    p = a.place("kernel", 0x3378000, align=2 * MiB, prefer=0x1100000)
    assert p.addr == 0x1200000 and p.size == 0x3378000


def test_init_size_overrun_moves_kernel():
    # RAM at pref_address is too short for init_size: the kernel goes to the next aligned
    # base where the whole init_size fits, not to pref_address with a truncated segment.
    m = mmap((0, 0x9FC00, "System RAM"), (MiB, 16 * MiB + 40 * MiB, "System RAM"),
             (56 * MiB + MiB, MiB, "Reserved"), (58 * MiB, 200 * MiB, "System RAM"))
    p = mm.Allocator(m).place("kernel", 0x3378000, align=2 * MiB, min_addr=16 * MiB,
                              prefer=16 * MiB)
    assert p.addr == 58 * MiB
    assert p.end <= 258 * MiB


def test_segment_never_spans_reserved_hole():
    m = mmap((MiB, 3 * MiB, "System RAM"), (4 * MiB, 4096, "ACPI Tables"),
             (4 * MiB + 4096, 8 * MiB, "System RAM"))
    a = mm.Allocator(m)
    big = a.place("initrd", 4 * MiB)                      # does not fit in [1, 4) MiB
    assert big.addr == 4 * MiB + 4096
    small = a.place("cmdline", 100)
    assert small.addr == MiB and small.size == 4096
    mm.check_placements(m, a.placements)


def test_overlapping_firmware_entries_non_ram_wins():
    m = mmap((MiB, 16 * MiB, "System RAM"), (2 * MiB, MiB, "Reserved"))
    assert m.ram() == [(MiB, 2 * MiB), (3 * MiB, 17 * MiB)]
    p = mm.Allocator(m).place("x", 2 * MiB)
    assert p.addr == 3 * MiB


def test_first_mib_is_avoided():
    m = mm.parse_memmap(QEMU_2G)
    a = mm.Allocator(m)
    assert a.place("zero-page", 4096).addr == MiB
    with pytest.raises(mm.NoRoom, match="not free RAM"):
        a.claim("vga", 0x90000, 4096)
    with pytest.raises(mm.NoRoom, match="below"):
        mm.check_placements(m, [mm.Placement("low", 0x1000, 4096)])


def test_no_room_is_a_named_error():
    a = mm.Allocator(mm.parse_memmap(QEMU_2G))
    with pytest.raises(mm.NoRoom) as info:
        a.place("initrd", 3 * GiB)
    assert info.value.name == "NoRoom"
    with pytest.raises(mm.NoRoom, match="below 0x1000000"):
        a.place("x", 32 * MiB, max_addr=16 * MiB)
    # Only a small map: the second placement of the same range fails, no overlap.
    small = mmap((MiB, 8192, "System RAM"))
    b = mm.Allocator(small)
    b.place("a", 4096)
    b.place("b", 4096)
    with pytest.raises(mm.NoRoom):
        b.place("c", 1)


def test_top_down_and_limits():
    a = mm.Allocator(mm.parse_memmap(QEMU_2G))
    p = a.place("initrd", 5 * MiB + 1, top_down=True, max_addr=0x80000000)
    assert p.end == 0x7FFE0000 and p.size == 5 * MiB + 4096
    q = a.place("slrt", 4096, top_down=True)
    assert q.end == p.addr


def test_claim_and_check():
    m = mm.parse_memmap(QEMU_2G)
    a = mm.Allocator(m)
    a.claim("sinit", 0x7F000000, 0x30000)
    with pytest.raises(mm.NoRoom):
        a.claim("again", 0x7F010000, 4096)
    with pytest.raises(InvalidArgument, match="page-aligned"):
        a.claim("odd", 0x7E000100, 4096)
    with pytest.raises(mm.NoRoom, match="overlap"):
        mm.check_placements(m, [mm.Placement("a", 2 * MiB, 8192), mm.Placement("b", 2 * MiB +
                                                                                4096, 4096)])
    with pytest.raises(mm.NoRoom, match="System RAM"):
        mm.check_placements(m, [mm.Placement("a", 0x7FFDF000, 8192)])
    with pytest.raises(InvalidArgument, match="power of two"):
        a.place("x", 4096, align=3 * 4096)


# --------------------------------------------------------------------------- random maps

TYPES = list(mm.TYPE_BY_NAME)


@st.composite
def random_maps(draw):
    entries, at = [], 0
    for _ in range(draw(st.integers(1, 12))):
        at += draw(st.integers(0, 64)) * 4096 + draw(st.sampled_from([0, 0, 0x123, 0xC00]))
        size = draw(st.integers(1, 4096)) * 4096 + draw(st.sampled_from([0, 0, 0x400]))
        kind = draw(st.sampled_from(TYPES + ["System RAM"] * 4))
        entries.append((at, size, kind))
        at += size - draw(st.sampled_from([0, 0, 0, 4096]))     # sometimes overlapping
    return mmap(*entries)


@settings(max_examples=200, deadline=None)
@given(memmap=random_maps(),
       requests=st.lists(st.tuples(st.integers(1, 3 << 20), st.sampled_from([4096, 1 << 16,
                                                                             2 << 20]),
                                   st.booleans(), st.one_of(st.none(), st.integers(0, 1 << 26))),
                         min_size=1, max_size=10))
def test_random_maps_place_only_in_ram_without_overlap(memmap, requests):
    a = mm.Allocator(memmap)
    for i, (size, align, top_down, prefer) in enumerate(requests):
        try:
            p = a.place(f"s{i}", size, align=align, top_down=top_down, prefer=prefer)
        except mm.NoRoom:
            continue
        assert p.addr % align == 0 and p.size >= size
    placed = a.placements
    mm.check_placements(memmap, placed)
    # Independently of the allocator's own bookkeeping: every byte of every placement is in a
    # RAM entry and in no non-RAM entry, above 1 MiB, and placements are disjoint.
    ram = [e for e in memmap.entries if e.type == bp.E820_RAM]
    other = [e for e in memmap.entries if e.type != bp.E820_RAM]
    for p in placed:
        assert p.addr >= mm.LOW_MEMORY
        assert not any(e.addr < p.end and p.addr < e.end for e in other)
        at = p.addr
        while at < p.end:       # walk through (possibly adjacent) RAM entries
            covering = [e for e in ram if e.addr <= at < e.end]
            assert covering, f"{p} leaves RAM at 0x{at:x}"
            at = max(e.end for e in covering)
    spans = sorted((p.addr, p.end) for p in placed)
    assert all(x[1] <= y[0] for x, y in itertools.pairwise(spans))
