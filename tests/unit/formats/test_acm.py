"""SINIT ACM header parsing and chipset matching (relaunchd.formats.acm), on synthetic modules
built from the documented layout (tests/fixtures/platforms/build.py, README.md)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.platforms.build import build_acm
from relaunchd.formats import acm


@pytest.mark.parametrize("header", [0, 3])
def test_parse_both_header_versions(header):
    m = acm.parse(build_acm(header=header, did=0xB005, rid=1, fms=0x806F0))
    assert m.header.module_type == 2 and m.header.vendor == 0x8086
    assert m.header.header_len == (161 if header == 0 else 224)
    assert m.header.header_version == (0 if header == 0 else 0x30000)
    assert m.header.date_text == "2024-01-31"
    assert m.is_sinit and not m.header.debug_signed
    assert m.info.os_sinit_data_version == 7
    assert [(c.vendor_id, c.device_id, c.revision_id) for c in m.info.chipset_ids] == [
        (0x8086, 0xB005, 1)]
    assert m.info.processor_ids is not None and m.info.processor_ids[0].fms == 0x806F0


def test_chipset_match_exact_and_mask():
    exact = acm.parse(build_acm(did=0xB005, rid=0x2))
    assert exact.matching_chipset(0x8086, 0xB005, 0x2) is not None
    assert exact.matching_chipset(0x8086, 0xB005, 0x3) is None
    assert exact.matching_chipset(0x8086, 0xB006, 0x2) is None
    assert exact.matching_chipset(0x1022, 0xB005, 0x2) is None
    masked = acm.parse(build_acm(did=0xB005, rid=0x6, revmask=1))
    assert masked.info.chipset_ids[0].revision_is_mask
    assert masked.matching_chipset(0x8086, 0xB005, 0x4) is not None   # 4 & 6 != 0
    assert masked.matching_chipset(0x8086, 0xB005, 0x1) is None       # 1 & 6 == 0


def test_processor_match_and_fms():
    fms = acm.cpu_fms(6, 143, 8)
    assert fms == 0x806F8
    assert acm.cpu_fms(25, 1, 1) == 0xA00F11      # AMD family 0x19: extended family 0xA
    m = acm.parse(build_acm(fms=0x806F0, fms_mask=0x0FFF3FF0))
    assert m.matches_processor(fms) is True
    assert m.matches_processor(acm.cpu_fms(6, 140, 1)) is False
    old = acm.parse(build_acm(info_version=3))
    assert old.info.processor_ids is None and old.matches_processor(fms) is None


def test_flags_and_types():
    assert acm.parse(build_acm(debug=1)).header.debug_signed
    assert not acm.parse(build_acm(acm_type=0)).is_sinit          # BIOS ACM
    assert not acm.parse(build_acm(acm_type=1 | 8)).is_sinit      # revocation ACM
    assert not acm.parse(build_acm(subtype=1)).is_sinit           # startup ACM


def _corrupt(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:0x40], "too short"),
    (lambda d: _corrupt(d, 0, "<H", 1), "not a chipset ACM"),
    (lambda d: _corrupt(d, 0x10, "<I", 0x1022), "not Intel"),
    (lambda d: _corrupt(d, 4, "<I", 4), "shorter than the fixed header"),
    (lambda d: _corrupt(d, 0x18, "<I", len(d)), "the file has"),
    (lambda d: _corrupt(d, 0x18, "<I", acm.MAX_MODULE), "implausibly large"),
    (lambda d: _corrupt(d, 0x7C, "<I", 100000), "info table"),
    (lambda d: _corrupt(d, 1216, "<B", 0), "UUID"),
    (lambda d: _corrupt(d, 1216 + 20, "<I", 0xFFFFFFF0), "chipset ID list count"),
    (lambda d: _corrupt(d, 1216 + 48, "<I", 1000), "runs past the module"),
    (lambda d: _corrupt(d, 1216 + 48, "<I", 5000), "claims 5000 entries"),
    (lambda d: _corrupt(d, 1216 + 40, "<I", 0xFFFFFF00), "processor ID list count"),
])
def test_named_errors(mutate, message):
    with pytest.raises(acm.InvalidAcm, match=message) as exc:
        acm.parse(mutate(build_acm(fms=0x806F0)))
    assert exc.value.name == "InvalidAcm"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 1400))
def test_hostile_bytes_only_raise_invalid_acm(noise, at):
    base = bytearray(build_acm(fms=0x806F0))
    base[at:at + len(noise)] = noise
    with contextlib.suppress(acm.InvalidAcm):
        acm.parse(bytes(base))
