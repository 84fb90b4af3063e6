"""relaunchd's TXT DL handler binary format (relaunchd.formats.txt_dl_handler) against
the C side it describes, daemon/relaunchd/launch/dl_handler/abi.h (reason codes, the
rld_dl_params offsets and widths), and the binary `make setup` builds (its header, every
damage named)."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import pytest

from relaunchd.errors import InvalidDlHandler
from relaunchd.formats import txt_dl_handler as dlh

REPO = Path(__file__).resolve().parents[3]
ABI_H = REPO / "daemon/relaunchd/launch/dl_handler/abi.h"
BUILT = REPO / "build/dl-handler/txt-dl-handler.bin"
needs_build = pytest.mark.skipif(not BUILT.exists(), reason="run `make setup`")

def test_reason_codes_match_abi_h():
    defines = dict((int(v), n) for n, v in re.findall(
        r"#define RLD_REASON_(\w+)\s+(\d+)", ABI_H.read_text()) if n not in ("NONE", "MAX"))
    assert {code: name for code, (name, _text) in dlh.REASONS.items()} == defines


def test_params_offsets_match_abi_h():
    """Every field of struct rld_dl_params, in order, at the offset abi.h's comment
    gives and with its C width, against the Python packing."""
    body = re.search(r"struct rld_dl_params \{(.*?)\}", ABI_H.read_text(), re.S).group(1)
    c_fields = [(name, int(width) // 8, int(off)) for width, name, off in re.findall(
        r"uint(\d+)_t (\w+);\s+/\*\s*(\d+)", body)]
    assert [f[0] for f in c_fields][3:] == [f.name for f in dataclasses.fields(dlh.Params)]
    widths = struct.Struct(dlh._PARAMS.format)
    packed_offsets, at = [], 0
    for code in re.findall(r"[QI]", widths.format):
        packed_offsets.append((at, {"Q": 8, "I": 4}[code]))
        at += {"Q": 8, "I": 4}[code]
    assert [(off, size) for _n, size, off in c_fields] == packed_offsets
    assert at == dlh.PARAMS_SIZE == int(re.search(r"RLD_PARAMS_SIZE\s+(\d+)",
                                                   ABI_H.read_text()).group(1))


@needs_build
def test_built_binary_header():
    data = BUILT.read_bytes()
    image = dlh.parse(data)
    h = image.header
    assert (h.abi_version, h.slrt_layout, h.align) == (1, 16, 4096)
    assert data[h.entry_offset:h.entry_offset + 2] == b"\x9c\xfa"     # pushfq; cli
    assert h.memory_size >= h.image_size + 16384                       # bss: stack, tables
    p = dlh.Params(flags=1, slrt=0x1000, kernel_base=0x1000000, detail=7)
    staged = image.with_params(p)
    assert len(staged) == len(data)
    assert dlh.unpack_params(staged[h.params_offset:h.params_offset + dlh.PARAMS_SIZE]) == p


@needs_build
@pytest.mark.parametrize("offset, value, match", [
    (0, b"XLDTXTDL", "not relaunchd's TXT DL handler"),
    (8, struct.pack("<I", 2), "ABI version 2"),
    (20, struct.pack("<I", 4), "file has"),
    (36, struct.pack("<I", 15), "SLRT layout v15"),
    (16, struct.pack("<I", 0), "entry"),
])
def test_header_damage_is_named(offset, value, match):
    data = bytearray(BUILT.read_bytes())
    data[offset:offset + len(value)] = value
    with pytest.raises(InvalidDlHandler, match=match):
        dlh.parse(bytes(data))


def test_too_short_or_too_long():
    with pytest.raises(InvalidDlHandler, match="too short"):
        dlh.parse(b"RLDTXTDL")
    with pytest.raises(InvalidDlHandler, match="out of range"):
        dlh.pack_params(dlh.Params(flags=1 << 40))


def test_reset_reason_decoding():
    assert dlh.reason_from_errorcode(0xC000C005).id == "dl-handler-txt-reset-pending"
    assert dlh.reason_from_errorcode(0xC0008011) is None      # Secure Launch's own
    assert dlh.reason_from_errorcode(None) is None
    assert dlh.reason(0x7FF).name.startswith("UNKNOWN")
