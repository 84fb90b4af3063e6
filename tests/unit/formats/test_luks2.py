"""LUKS2 headers laid out from the spec (tests/support/luks2_header.py) and then broken:
truncated, bad magic, wrong version or size, mis-checksummed, misplaced, bad JSON metadata.
Each is InvalidVolume naming what is wrong. Real headers written by cryptsetup are read in
tests/integration/test_sealed_volumes.py."""

from __future__ import annotations

import hashlib
import struct

import pytest

from relaunchd.errors import InvalidVolume
from relaunchd.formats import luks2, luks_tokens
from support.luks2_header import EMPTY, make_header


def test_luks2_header_laid_out_by_the_spec_parses():
    header = luks2.parse_copy(make_header({**EMPTY, "tokens": {
        "3": {"type": "other", "keyslots": ["0"]}}}), 0)
    assert header.uuid == "12345678-1234-1234-1234-123456789abc" and header.label == "label"
    assert header.tokens == {3: {"type": "other", "keyslots": ["0"]}}
    assert luks_tokens.tpm_sealings(header) == []


def test_higher_seqid_wins():
    primary = luks2.parse_copy(make_header(EMPTY, seqid=4), 0)
    secondary = luks2.parse_copy(make_header(EMPTY, offset=16384, seqid=5), 16384)
    assert luks2.current([primary, secondary]) is secondary


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h[:100], "truncated"),
    (lambda h: b"LUKZ" + h[4:], "bad magic"),
    (lambda h: h[:6] + b"\x00\x01" + h[8:], "LUKS version 1"),
    (lambda h: h[:8] + struct.pack(">Q", 12345) + h[16:], "hdr_size 12345"),
    (lambda h: h[:5000] + b"X" + h[5001:], "checksum"),
    (lambda h: h[:256] + struct.pack(">Q", 4096) + h[264:], "says it is at 4096"),
])
def test_luks2_bad_headers(mutate, match):
    with pytest.raises(InvalidVolume, match=match):
        luks2.parse_copy(mutate(make_header(EMPTY)), 0)


@pytest.mark.parametrize("metadata, match", [
    ({"keyslots": {}}, "lacks the object"),
    ({**EMPTY, "tokens": {"x": {"type": "a"}}}, "malformed"),
    ({**EMPTY, "tokens": {"40": {"type": "a"}}}, "malformed"),
    ({**EMPTY, "tokens": {"1": {"keyslots": []}}}, "no type"),
])
def test_luks2_bad_json(metadata, match):
    with pytest.raises(InvalidVolume, match=match):
        luks2.parse_copy(make_header(metadata), 0)


def test_luks2_json_that_is_not_json():
    raw = bytearray(make_header(EMPTY))
    raw[4096:4100] = b"{{{{"
    area = bytes(raw[:448]) + bytes(64) + bytes(raw[512:])
    fixed = area[:448] + hashlib.sha256(area).digest().ljust(64, b"\0") + area[512:]
    with pytest.raises(InvalidVolume, match="not valid JSON"):
        luks2.parse_copy(fixed, 0)
