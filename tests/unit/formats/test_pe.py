"""PE/COFF headers (relaunchd.formats.pe): the ranges the Authenticode digest covers."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.formats import pe

# --------------------------------------------------------------------------- authenticode_ranges


def headers(sections: list[tuple[int, int]], *, size_of_headers: int = 0x400,
            file_size: int, table: tuple[int, int] = (0, 0)) -> pe.PeHeaders:
    return pe.PeHeaders(
        machine=0x8664, pe32_plus=True, subsystem=10, size_of_headers=size_of_headers,
        size_of_image=0x10000, checksum_offset=0xD8, cert_dir_offset=0x128,
        cert_table_offset=table[0], cert_table_size=table[1],
        sections=tuple(pe.PeSection(name=f".s{i}", index=i, virtual_address=0x1000 * (i + 1),
                                    virtual_size=size, raw_offset=off, raw_size=size,
                                    characteristics=0)
                       for i, (off, size) in enumerate(sections)),
        file_size=file_size)


HEADER_RANGES = [(0, 0xD8), (0xDC, 0x128 - 0xDC), (0x130, 0x400 - 0x130)]


def test_ranges_skip_checksum_and_cert_entry_and_sort_sections():
    h = headers([(0x600, 0x200), (0x400, 0x200), (0x800, 0)], file_size=0x900,
                table=(0x800, 0x100))
    assert pe.authenticode_ranges(h) == [*HEADER_RANGES, (0x400, 0x200), (0x600, 0x200)]


def test_ranges_include_trailing_data_before_the_table():
    h = headers([(0x400, 0x200)], file_size=0x700, table=(0x680, 0x80))
    assert pe.authenticode_ranges(h)[-1] == (0x600, 0x80)


def test_ranges_of_unsigned_image_cover_the_tail():
    h = headers([(0x400, 0x200)], file_size=0x640)
    assert pe.authenticode_ranges(h)[-1] == (0x600, 0x40)


def test_ranges_leave_out_a_table_in_the_middle():
    h = headers([(0x400, 0x200)], file_size=0x800, table=(0x600, 0x100))
    assert pe.authenticode_ranges(h)[-2:] == [(0x400, 0x200), (0x700, 0x100)]


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"sections": [(0x400, 0x200), (0x800, 0x200)], "file_size": 0xA00}, "gaps"),
    ({"sections": [(0x400, 0x200)], "size_of_headers": 0x600, "file_size": 0x600},
     "overlaps"),
    ({"sections": [(0x400, 0x200)], "size_of_headers": 0x100, "file_size": 0x600},
     "not inside SizeOfHeaders"),
    ({"sections": [(0x400, 0x200)], "file_size": 0x800, "table": (0x500, 0x100)},
     "inside the signed part"),
])
def test_unsupported_layouts(kw, fragment):
    with pytest.raises(InvalidImage, match=fragment):
        pe.authenticode_ranges(headers(**kw))
