"""The x86_64 segment plan (relaunchd.formats.x86.segment_plan) for the real Debian kernel
in a 2 GiB QEMU guest's memory map: the layout kexec-load-notes.md booted, and its failure
modes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86 import boot_params as bp
from relaunchd.formats.x86 import memory_ranges as mm
from relaunchd.formats.x86 import segment_plan as sg
from support.memmaps import QEMU_2G

MiB = 1 << 20
GiB = 1 << 30

MEMMAP = mm.parse_memmap(QEMU_2G)
CMDLINE = b"console=ttyS0 root=/dev/vda1 nokaslr relaunchd.id=0f1e2d3c"


@pytest.fixture(scope="module")
def kernel(debian_kernel):
    fd = os.open(debian_kernel.vmlinuz, os.O_RDONLY)
    yield FileRange(fd, 0, os.fstat(fd).st_size)
    os.close(fd)


@pytest.fixture(scope="module")
def initrd():
    """A 9 MiB + 123 bytes initrd file (contents deterministic)."""
    with tempfile.TemporaryFile() as f:
        f.write(hashlib.shake_256(b"initrd").digest(9 * MiB + 123))
        f.flush()
        yield FileRange(f.fileno(), 0, 9 * MiB + 123)


def test_full_plan_for_debian_kernel(kernel, initrd):
    slrt = b"SLRT-bytes-" * 50
    plan = sg.plan_segments(kernel, cmdline=CMDLINE, memmap=MEMMAP, initrd=initrd, slrt=slrt,
                            firmware=sg.FirmwareInfo(acpi_rsdp=0xF5A40))
    h = plan.header
    seg = {s.name: s for s in plan.segments}
    assert list(seg) == ["kernel", "initrd", "zero-page", "cmdline", "setup-data", "purgatory"]

    # Kernel: pref_address (free), aligned, memsz = init_size, data = the protected-mode part.
    k = seg["kernel"]
    assert k.address == h.pref_address == 0x1000000
    assert k.address % h.kernel_alignment == 0
    assert k.memsz == h.init_size == 0x3378000
    assert isinstance(k.data, FileRange)
    assert (k.data.offset, k.data.length) == (h.kernel_offset, kernel.length - h.kernel_offset)
    assert plan.kernel_entry == k.address + 0x200

    # Initrd: top-down below initrd_addr_max, referenced, never copied.
    i = seg["initrd"]
    assert i.data is initrd
    assert i.end == 0x7FFE0000 and i.end - 1 <= h.initrd_addr_max
    assert i.memsz == 9 * MiB + 4096

    # Small pages below 4 GiB, right above 1 MiB (as in the verified run).
    for name in ("zero-page", "cmdline", "setup-data", "purgatory"):
        assert MiB <= seg[name].address < 2 * MiB and seg[name].memsz == 4096
    assert seg["cmdline"].data == CMDLINE + b"\0"

    # Every segment in RAM, page-granular, disjoint: the check the kernel does not make.
    mm.check_placements(MEMMAP, [mm.Placement(s.name, s.address, s.memsz) for s in plan.segments])
    assert all(s.bufsz <= s.memsz for s in plan.segments)

    # Zero page: what the notes list as sufficient, at the documented offsets.
    zp = plan.zero_page
    assert seg["zero-page"].data == zp and plan.zero_page_address == seg["zero-page"].address
    assert zp[0x1EF] == 0 and zp[0x210] == 0xFF and zp[0x211] == bp.LOADED_HIGH
    assert struct.unpack_from("<I", zp, 0x228)[0] == seg["cmdline"].address
    assert struct.unpack_from("<II", zp, 0x218) == (i.address, initrd.length)
    assert struct.unpack_from("<Q", zp, 0x250)[0] == seg["setup-data"].address
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xF5A40
    assert zp[0x1E8] == 7
    assert bp.unpack_e820(zp[0x2D0:0x2D0 + 7 * 20]) == list(MEMMAP.entries)
    assert zp[0x1C0:0x1E0] == bytes(32)                    # not an EFI boot

    # The SLRT: 0x078 points into our setup_data node, which holds exactly the bytes.
    slr = struct.unpack_from("<Q", zp, 0x078)[0]
    assert slr == plan.slrt_address == seg["setup-data"].address + 16
    nodes = bp.parse_setup_data(seg["setup-data"].data, seg["setup-data"].address,
                                seg["setup-data"].address)
    assert nodes == [bp.SetupDataNode(bp.SETUP_RELAUNCHD_SLRT, slrt)]

    # Purgatory: RSI = zero page, jump to kernel + 0x200; it is the kexec entry.
    p = seg["purgatory"]
    assert plan.entry == p.address
    assert p.data == (b"\xfa\x48\xbe" + struct.pack("<Q", plan.zero_page_address)
                      + b"\x48\xb8" + struct.pack("<Q", k.address + 0x200) + b"\xff\xe0")


def test_plan_json_hashes_every_segment(kernel, initrd):
    plan = sg.plan_segments(kernel, cmdline=CMDLINE, memmap=MEMMAP, initrd=initrd)
    doc = json.loads(json.dumps(plan.to_json()))
    assert doc["boot_protocol"] == "2.15"
    assert doc["entry"] == plan.entry and doc["slr_table_addr"] is None
    by_name = {s["name"]: s for s in doc["segments"]}
    assert set(by_name) == {"kernel", "initrd", "zero-page", "cmdline", "purgatory"}
    whole = os.pread(kernel.fd, kernel.length, 0)
    assert by_name["kernel"]["sha256"] == hashlib.sha256(
        whole[plan.header.kernel_offset:]).hexdigest()
    assert by_name["initrd"]["sha256"] == hashlib.sha256(
        os.pread(initrd.fd, initrd.length, 0)).hexdigest()
    assert by_name["zero-page"]["sha256"] == hashlib.sha256(plan.zero_page).hexdigest()
    assert by_name["kernel"]["address"] == 0x1000000
    assert by_name["kernel"]["memsz"] == plan.header.init_size
    assert by_name["kernel"]["range"] == "0x1000000-0x4377fff"
    # No setup_data when there is nothing to chain.
    assert struct.unpack_from("<QQ", plan.zero_page, 0x250)[0] == 0
    assert struct.unpack_from("<Q", plan.zero_page, 0x078)[0] == 0


def test_pref_address_taken_moves_to_next_aligned_base(kernel):
    sinit = sg.SegmentRequest("sinit", b"\x00" * 0x30000, address=0x1200000)
    plan = sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP, extras=[sinit])
    k = plan.segment("kernel")
    assert k.address == 0x1400000                       # next 2 MiB boundary after SINIT
    assert plan.segment("sinit").address == 0x1200000
    assert plan.kernel_entry == 0x1400200


def test_extras_constraints_and_reservation(kernel, initrd):
    handler = sg.SegmentRequest("dl-handler", b"\x90" * 5000, align=0x10000)
    log = sg.SegmentRequest("drtm-log", b"", memsz=0x10000, reserve=True)
    acm = sg.SegmentRequest("sinit", b"ACM" * 100, address=0x7F000000)

    def build(addresses):
        # An SLRT that records where the DL handler and the log went.
        return struct.pack("<QQQ", addresses["dl-handler"][0], *addresses["drtm-log"])

    plan = sg.plan_segments(kernel, cmdline=CMDLINE, memmap=MEMMAP, initrd=initrd,
                            slrt=sg.SlrtBuilder(64, build), extras=[handler, log, acm])
    seg = {s.name: s for s in plan.segments}
    assert seg["dl-handler"].address % 0x10000 == 0
    assert seg["sinit"].address == 0x7F000000
    assert seg["drtm-log"].memsz == 0x10000 and seg["drtm-log"].bufsz == 0
    assert all(s.end <= 4 * GiB for s in plan.segments)
    assert seg["initrd"].end == 0x7FFE0000                # top-down, beside the fixed ACM
    mm.check_placements(MEMMAP, [mm.Placement(s.name, s.address, s.memsz) for s in plan.segments])
    node = bp.parse_setup_data(seg["setup-data"].data, seg["setup-data"].address,
                               seg["setup-data"].address)[0]
    assert node.data == struct.pack("<QQQ", seg["dl-handler"].address, seg["drtm-log"].address,
                                    0x10000) + bytes(40)
    # The log buffer is handed to the next kernel as reserved, the rest unchanged.
    e820 = bp.unpack_e820(plan.zero_page[0x2D0:0x2D0 + plan.zero_page[0x1E8] * 20])
    assert bp.E820Entry(seg["drtm-log"].address, 0x10000, bp.E820_RESERVED) in e820
    assert e820 == list(plan.e820)


def test_efi_boot_fields(kernel):
    memmap_bytes = bytes(range(48)) * 20
    efi = sg.EfiBoot(systab=0x7F9EE018, memdesc_size=48, memdesc_version=1,
                     memmap=memmap_bytes, setup_efi=b"E" * 80)
    plan = sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP, firmware=sg.FirmwareInfo(efi=efi))
    zp = plan.zero_page
    sig, systab, dsize, dver, mmap_lo, msize, systab_hi, mmap_hi = struct.unpack_from(
        "<4sIIIIIII", zp, 0x1C0)
    assert sig == b"EL64" and systab == 0x7F9EE018 and systab_hi == 0
    assert (dsize, dver, msize) == (48, 1, len(memmap_bytes))
    seg = plan.segment("efi-memmap")
    assert (mmap_hi << 32 | mmap_lo) == seg.address and seg.data == memmap_bytes
    sd = plan.segment("setup-data")
    assert bp.parse_setup_data(sd.data, sd.address, sd.address) == [
        bp.SetupDataNode(bp.SETUP_EFI, b"E" * 80)]


def test_more_than_128_e820_entries_use_setup_e820_ext(kernel):
    raw = dict(QEMU_2G)
    # 150 extra 4 KiB reserved ranges high in RAM (a fragmented firmware map).
    for n in range(150):
        raw[f"x{n}"] = {"start": hex(0x40000000 + n * 0x10000),
                        "end": hex(0x40000000 + n * 0x10000 + 0xFFF), "type": "Reserved"}
    m = mm.parse_memmap(raw)
    plan = sg.plan_segments(kernel, cmdline=b"x", memmap=m)
    zp = plan.zero_page
    assert zp[0x1E8] == 128
    sd = plan.segment("setup-data")
    nodes = bp.parse_setup_data(sd.data, sd.address, struct.unpack_from("<Q", zp, 0x250)[0])
    assert [n.type for n in nodes] == [bp.SETUP_E820_EXT]
    assert bp.unpack_e820(zp[0x2D0:0x2D0 + 128 * 20]) + bp.unpack_e820(nodes[0].data) \
        == list(m.entries)


def test_cmdline_checks(kernel):
    limit = 2047
    ok = sg.plan_segments(kernel, cmdline=b"a" * limit + b"\0", memmap=MEMMAP)
    assert ok.segment("cmdline").data == b"a" * limit + b"\0"
    with pytest.raises(InvalidArgument, match="at most 2047"):
        sg.plan_segments(kernel, cmdline=b"a" * (limit + 1), memmap=MEMMAP)
    with pytest.raises(InvalidArgument, match="NUL"):
        sg.plan_segments(kernel, cmdline=b"a\0b", memmap=MEMMAP)


def test_no_room(kernel, initrd):
    # 64 MiB of RAM: the kernel's init_size (51.5 MiB from 16 MiB) does not fit.
    small = mm.parse_memmap({"0": {"start": "0x100000", "end": "0x3ffffff",
                                   "type": "System RAM"}})
    with pytest.raises(mm.NoRoom, match="kernel") as info:
        sg.plan_segments(kernel, cmdline=b"x", memmap=small)
    assert info.value.name == "NoRoom"
    # Room for the kernel but not for a 40 MiB initrd beside it (15 MiB below the kernel,
    # 12.5 MiB above it). The file is sparse: nothing is read to plan it.
    tight = mm.parse_memmap({"0": {"start": "0x100000", "end": "0x4ffffff",
                                   "type": "System RAM"}})
    with tempfile.TemporaryFile() as f:
        f.truncate(40 * MiB)
        big = FileRange(f.fileno(), 0, 40 * MiB)
        with pytest.raises(mm.NoRoom, match="initrd"):
            sg.plan_segments(kernel, cmdline=b"x", memmap=tight, initrd=big)
        plan = sg.plan_segments(kernel, cmdline=b"x", memmap=tight, initrd=initrd)
        assert plan.segment("initrd").end == 0x5000000


def test_duplicate_and_too_many_segments(kernel):
    with pytest.raises(InvalidArgument, match="twice"):
        sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP,
                         extras=[sg.SegmentRequest("kernel", b"x")])
    with pytest.raises(InvalidArgument, match="at most 16"):
        sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP,
                         extras=[sg.SegmentRequest(f"b{n}", b"x") for n in range(14)])


def test_initrd_above_4g_only_as_fallback(kernel):
    # 80 MiB of low RAM (kernel fits, a 40 MiB initrd does not), 1 GiB above 4 GiB: the
    # kernel sets XLF_CAN_BE_LOADED_ABOVE_4G, so the initrd goes high via the ext_ fields.
    m = mm.parse_memmap({
        "0": {"start": "0x100000", "end": "0x4ffffff", "type": "System RAM"},
        "1": {"start": "0x100000000", "end": "0x13fffffff", "type": "System RAM"},
    })
    with tempfile.TemporaryFile() as f:
        f.truncate(40 * MiB)
        big = FileRange(f.fileno(), 0, 40 * MiB)
        plan = sg.plan_segments(kernel, cmdline=b"x", memmap=m, initrd=big)
    i = plan.segment("initrd")
    assert i.address == 0x140000000 - 40 * MiB
    lo, size = struct.unpack_from("<II", plan.zero_page, 0x218)
    hi, size_hi = struct.unpack_from("<II", plan.zero_page, 0x0C0)
    assert (hi << 32 | lo, size_hi << 32 | size) == (i.address, 40 * MiB)
    assert all(s.end <= 4 * GiB for s in plan.segments if s.name != "initrd")


def test_segment_loader_slrt_sizes_are_exact(kernel, tmp_path):
    """The issue's case: an initrd of 0x49590 bytes sits in a 0x4a000-byte segment, and
    the SLRT's RAMDISK entry must say 0x49590 (what the kernel hashes; the predicted
    event hashes exactly those bytes). DL_INFO's dlme_size/dlme_entry are left to the
    DL handler (the MLE header exists only after decompression)."""
    from relaunchd.formats import slrt
    from relaunchd.launch import segment_loader
    from relaunchd.platform.sysroot import SysRoot
    from support.memmaps import write_memmap

    write_memmap(tmp_path, QEMU_2G)
    data = hashlib.shake_256(b"small initrd").digest(0x49590)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        plan, content = segment_loader.plan(kernel, FileRange(f.fileno(), 0, len(data)),
                                            CMDLINE, SysRoot(str(tmp_path)),
                                            segment_loader.SegmentInputs())
        events = segment_loader.predicted_events(
            content, cmdline=CMDLINE, initrd_digests={"sha256": hashlib.sha256(data).digest()})
    assert plan.segment("initrd").memsz == 0x4A000
    table = slrt.parse(content.table)
    dl = next(e for e in table.entries if isinstance(e, slrt.DlInfo))
    ramdisk = next(p for p in content.policy.entries if p.entity_type == slrt.ET_RAMDISK)
    assert (ramdisk.entity, ramdisk.size) == (plan.segment("initrd").address, 0x49590)
    assert events[0].label == "Measured Kernel initrd"
    assert events[0].digests["sha256"] == hashlib.sha256(data).digest()
    assert (dl.dlme_base, dl.dlme_size, dl.dlme_entry) == (plan.segment("kernel").address, 0, 0)
    assert (dl.dce_base, dl.dce_size, dl.dl_launch) == (0, 0, 0)      # rehearsal: no DCE


def test_blob_below_the_kernel_and_filled_after_placement(kernel):
    seen = {}

    def fill(addresses):
        seen.update(addresses)
        return struct.pack("<Q", addresses["kernel"][0]) + bytes(8)

    extras = [sg.SegmentRequest("ptab", b"", memsz=0x5000, below_kernel=True),
              sg.SegmentRequest("filled", bytes(16), fill=fill)]
    plan = sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP, extras=extras,
                            kernel_below_4g=True, ceiling=0x40000000)
    seg = {s.name: s for s in plan.segments}
    assert seg["ptab"].address + seg["ptab"].memsz == seg["kernel"].address
    assert seg["filled"].data == struct.pack("<Q", seg["kernel"].address) + bytes(8)
    assert seen["ptab"] == (seg["ptab"].address, 0x5000)
    assert all(s.end <= 0x40000000 for s in plan.segments)
    with pytest.raises(InvalidArgument, match="filled in 8 bytes, 16 were planned"):
        sg.plan_segments(kernel, cmdline=b"x", memmap=MEMMAP,
                         extras=[sg.SegmentRequest("bad", bytes(16), fill=lambda a: bytes(8))])
