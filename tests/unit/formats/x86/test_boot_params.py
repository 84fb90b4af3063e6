"""bzImage setup header, zero page and setup_data (relaunchd.formats.x86.boot_params)
against boot.rst / zero-page.rst offsets and the verified rules of kexec-load-notes.md."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidArgument, InvalidKernel
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86 import boot_params as bp


@pytest.fixture(scope="module")
def kernel_file(debian_kernel):
    fd = os.open(debian_kernel.vmlinuz, os.O_RDONLY)
    yield FileRange(fd, 0, os.fstat(fd).st_size)
    os.close(fd)


@pytest.fixture(scope="module")
def header(kernel_file) -> bp.SetupHeader:
    return bp.parse_setup_header(kernel_file)


@pytest.fixture
def image_of(request):
    """Turns bytes into a FileRange over an anonymous file, closed after the test."""
    def make(data: bytes) -> FileRange:
        fd = os.memfd_create("bzimage", os.MFD_CLOEXEC)
        request.addfinalizer(lambda: os.close(fd))
        os.write(fd, data)
        return FileRange(fd, 0, len(data))
    return make


# --------------------------------------------------------------------------- real kernel


def test_debian_kernel_header(header, kernel_file):
    first = kernel_file.pread(0, 0x300)
    assert header.version >= 0x020C
    assert header.version == struct.unpack_from("<H", first, 0x206)[0]
    assert header.kernel_64 and header.above_4g
    assert header.xloadflags & bp.XLF_KERNEL_64
    assert header.xloadflags & bp.XLF_CAN_BE_LOADED_ABOVE_4G
    assert header.relocatable
    assert header.kernel_alignment == 2 << 20
    assert header.pref_address == 0x1000000
    assert header.pref_address % header.kernel_alignment == 0
    # init_size covers the decompressed kernel: far more than the compressed file.
    assert header.init_size > header.kernel_size > header.syssize * 16 - 1
    assert header.init_size == struct.unpack_from("<I", first, 0x260)[0]
    assert header.cmdline_size == 2047
    assert header.initrd_addr_max == 0x7FFFFFFF
    assert header.loadflags & bp.LOADED_HIGH
    assert header.header_end == 0x202 + first[0x201]
    assert header.raw == first[0x1F1:header.header_end]
    setup_sects = first[0x1F1] or 4
    assert header.kernel_offset == (setup_sects + 1) * 512
    assert header.kernel_offset + header.kernel_size == kernel_file.length
    pm = header.protected_mode(kernel_file)
    assert (pm.fd, pm.offset, pm.length) == (kernel_file.fd, header.kernel_offset,
                                            header.kernel_size)
    # The file's own sentinel is 0xff: the reason the zero page is built from zeros.
    assert first[0x1EF] == 0xFF


def test_zero_page_from_real_header(header):
    e820 = [bp.E820Entry(0, 0x9FC00, 1), bp.E820Entry(0x9FC00, 0x400, 2),
            bp.E820Entry(0x100000, 0x7FEE0000, 1)]
    page = bp.build_zero_page(
        header, cmd_line_ptr=0x101000, e820=e820, ramdisk_image=0x7F000000,
        ramdisk_size=0x123456, setup_data=0x102000, acpi_rsdp_addr=0xF5A40,
        slr_table_addr=0x102010)
    assert len(page) == 4096
    assert page[0x1EF] == 0                                   # sentinel
    assert page[0x1F1:header.header_end] != header.raw        # loader fields written over...
    assert page[0x202:0x206] == b"HdrS"                       # ...but the header is there
    assert page[0x210] == 0xFF                                # type_of_loader
    assert page[0x211] == bp.LOADED_HIGH
    assert struct.unpack_from("<Q", page, 0x078)[0] == 0x102010
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xF5A40
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x101000
    assert struct.unpack_from("<II", page, 0x218) == (0x7F000000, 0x123456)
    assert struct.unpack_from("<III", page, 0x0C0) == (0, 0, 0)
    assert struct.unpack_from("<Q", page, 0x250)[0] == 0x102000
    assert page[0x1E8] == 3
    assert bp.unpack_e820(page[0x2D0:0x2D0 + 60]) == e820
    assert page[0x2D0 + 60:0x2D0 + 2560] == bytes(2560 - 60)
    # Fields the loader does not own stay as the kernel built them.
    for off in (0x1F1, 0x206, 0x230, 0x234, 0x236, 0x238, 0x258, 0x260):
        assert page[off] == header.raw[off - 0x1F1]
    # Everything outside the header and the fields we set is zero.
    assert page[:0x070] == bytes(0x70)
    assert page[0x080:0x1E8] == bytes(0x1E8 - 0x80)
    assert page[header.header_end:0x2D0] == bytes(0x2D0 - header.header_end)
    assert page[0xCD0:] == bytes(4096 - 0xCD0)


def test_zero_page_ext_fields_above_4g(header):
    page = bp.build_zero_page(header, cmd_line_ptr=0x1_2345_6000, e820=[],
                              ramdisk_image=0x2_0000_0000, ramdisk_size=0x1_0000_1000)
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x23456000
    assert struct.unpack_from("<I", page, 0x0C8)[0] == 0x1
    assert struct.unpack_from("<II", page, 0x218) == (0, 0x1000)
    assert struct.unpack_from("<II", page, 0x0C0) == (0x2, 0x1)


def test_zero_page_efi_info(header):
    efi = bp.EfiInfo(systab=0x1_7F9E_E018, memmap=0x7E000000, memmap_size=48 * 30,
                     memdesc_size=48, memdesc_version=1)
    page = bp.build_zero_page(header, cmd_line_ptr=0x101000, e820=[], efi=efi)
    assert page[0x1C0:0x1C4] == b"EL64"
    sig, systab, dsize, dver, mmap, msize, systab_hi, mmap_hi = struct.unpack_from(
        "<4sIIIIIII", page, 0x1C0)
    assert (systab_hi << 32 | systab) == 0x1_7F9E_E018
    assert (mmap_hi << 32 | mmap) == 0x7E000000
    assert (dsize, dver, msize) == (48, 1, 48 * 30)
    assert page[0x1E0:0x1E8] == bytes(8)


def test_zero_page_limits(header):
    with pytest.raises(InvalidArgument, match="SETUP_E820_EXT"):
        bp.build_zero_page(header, cmd_line_ptr=0x1000,
                           e820=[bp.E820Entry(i << 20, 1 << 20, 1) for i in range(129)])
    page = bp.build_zero_page(header, cmd_line_ptr=0x1000,
                              e820=[bp.E820Entry(i << 20, 1 << 20, 1) for i in range(128)])
    assert page[0x1E8] == 128
    assert bp.unpack_e820(page[0x2D0:0x2D0 + 128 * 20])[-1] == bp.E820Entry(127 << 20, 1 << 20, 1)


# --------------------------------------------------------------------------- malformed headers


def fake_bzimage(**fields) -> bytes:
    """A minimal protocol-2.15 bzImage: 4 setup sectors plus a small protected-mode part."""
    img = bytearray(5 * 512 + 0x1000)
    img[0x1F1] = fields.get("setup_sects", 4)
    struct.pack_into("<I", img, 0x1F4, fields.get("syssize", 0x100))
    struct.pack_into("<H", img, 0x1FE, fields.get("boot_flag", 0xAA55))
    img[0x200] = 0xEB
    img[0x201] = fields.get("jump", 0x6A)
    img[0x202:0x206] = fields.get("magic", b"HdrS")
    struct.pack_into("<H", img, 0x206, fields.get("version", 0x020F))
    img[0x211] = fields.get("loadflags", 1)
    struct.pack_into("<IIBBHI", img, 0x22C, 0x7FFFFFFF, fields.get("align", 0x200000),
                     fields.get("relocatable", 1), 21, fields.get("xlf", 0x7F), 2047)
    struct.pack_into("<QI", img, 0x258, 0x1000000, fields.get("init_size", 0x10000))
    return bytes(img[:fields.get("truncate", len(img))])


def test_fake_bzimage_parses(image_of):
    h = bp.parse_setup_header(image_of(fake_bzimage()))
    assert (h.version, h.setup_sects, h.kernel_offset, h.kernel_size) == (0x020F, 4, 2560, 0x1000)
    # setup_sects 0 means 4 (boot.rst).
    assert bp.parse_setup_header(image_of(fake_bzimage(setup_sects=0))).kernel_offset == 2560


@pytest.mark.parametrize("fields, message", [
    ({"magic": b"HdrX"}, "no 'HdrS'"),
    ({"version": 0x020B}, "older than 2.12"),
    ({"boot_flag": 0}, "boot_flag"),
    ({"jump": 0x20}, "setup header ends"),
    ({"jump": 0xF0}, "setup header ends"),
    ({"loadflags": 0}, "LOADED_HIGH"),
    ({"xlf": 0x7E}, "XLF_KERNEL_64"),
    ({"align": 0x300000}, "power of two"),
    ({"align": 0}, "power of two"),
    ({"init_size": 0}, "init_size is 0"),
    ({"init_size": 0x100}, "smaller than the compressed kernel"),
    ({"syssize": 0x1000}, "truncated"),
    ({"truncate": 0x200}, "too small"),
    ({"truncate": 2560}, "beyond the file"),
])
def test_malformed_headers(fields, message, image_of):
    with pytest.raises(InvalidKernel, match=message) as info:
        bp.parse_setup_header(image_of(fake_bzimage(**fields)))
    assert info.value.name == "InvalidKernel"


# --------------------------------------------------------------------------- setup_data


@settings(max_examples=100, deadline=None)
@given(nodes=st.lists(st.builds(bp.SetupDataNode, st.integers(0, 0x7FFFFFFF),
                                st.binary(max_size=100)), max_size=6),
       base=st.integers(1, 1 << 40).map(lambda v: v * 8))
def test_setup_data_round_trip(nodes, base):
    blob, addrs = bp.build_setup_data(nodes, base)
    assert len(blob) == bp.setup_data_size(nodes)
    assert all(a % 8 == 0 for a in addrs)
    head = addrs[0] if addrs else 0
    assert bp.parse_setup_data(blob, base, head) == nodes
    for i, addr in enumerate(addrs):
        nxt, type_, length = struct.unpack_from("<QII", blob, addr - base)
        assert nxt == (addrs[i + 1] if i + 1 < len(addrs) else 0)
        assert (type_, length) == (nodes[i].type, len(nodes[i].data))


def test_setup_data_layout_and_errors():
    slrt = bp.SetupDataNode(bp.SETUP_RELAUNCHD_SLRT, b"\x01" * 13)
    blob, addrs = bp.build_setup_data([slrt, bp.SetupDataNode(bp.SETUP_RNG_SEED, b"r")], 0x102000)
    assert addrs == (0x102000, 0x102000 + 32)          # 16 + 13 rounded up to 8
    assert blob[16:29] == b"\x01" * 13
    # Our type: outside the kernel's SETUP_* enum and not an indirect type.
    assert 0x100 < bp.SETUP_RELAUNCHD_SLRT < bp.SETUP_INDIRECT
    with pytest.raises(InvalidArgument, match="8-byte"):
        bp.build_setup_data([slrt], 0x102004)
    with pytest.raises(InvalidArgument, match="direct type"):
        bp.build_setup_data([bp.SetupDataNode(bp.SETUP_INDIRECT | 1, b"")], 8)
    looped = bytearray(blob)
    struct.pack_into("<Q", looped, 32, 0x102000)
    with pytest.raises(InvalidArgument, match="loops"):
        bp.parse_setup_data(bytes(looped), 0x102000, 0x102000)
    with pytest.raises(InvalidArgument, match="outside"):
        bp.parse_setup_data(blob, 0x102000, 0x200000)
    with pytest.raises(InvalidArgument, match="payload"):
        bp.parse_setup_data(blob[:20], 0x102000, 0x102000)
    with pytest.raises(InvalidArgument, match="non-zero"):
        bp.build_setup_data([slrt], 0)


def test_e820_ext_node_and_marking():
    entries = [bp.E820Entry(i << 20, 1 << 20, 1) for i in range(3)]
    node = bp.e820_ext_node(entries)
    assert node.type == bp.SETUP_E820_EXT and bp.unpack_e820(node.data) == entries
    ram = [bp.E820Entry(0, 0x9FC00, 1), bp.E820Entry(0x100000, 0x7FF00000, 1)]
    marked = bp.mark_e820(ram, 0x7F000000, 0x10000)
    assert marked == [bp.E820Entry(0, 0x9FC00, 1), bp.E820Entry(0x100000, 0x7EF00000, 1),
                      bp.E820Entry(0x7F000000, 0x10000, 2),
                      bp.E820Entry(0x7F010000, 0xFF0000, 1)]
    # Marking the neighbouring range merges into one reserved entry.
    again = bp.mark_e820(marked, 0x7F010000, 0x1000)
    assert bp.E820Entry(0x7F000000, 0x11000, 2) in again
