"""The DL handler's contract on the Python side (formats/txt_dl_handler.py,
launch/dl_handler.py) against abi.h and the built binary, and the stage-time
pieces that need no emulator (PMRs, page-table room, ACM fit, trusted reads)."""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from pathlib import Path

import pytest

from fixtures.platforms.build import build_acm
from relaunchd.errors import InvalidDlHandler, NotReady
from relaunchd.formats import acm as acmfmt
from relaunchd.formats import txt_dl_handler as dlh
from relaunchd.launch import dl_handler
from relaunchd.platform.memory_map import parse_memmap
from support.memmaps import QEMU_2G

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


def test_pmrs_from_the_memory_map():
    assert dl_handler.pmrs(parse_memmap(QEMU_2G)) == dl_handler.Pmrs(0, 0x7FE00000, 0, 0)
    big = dict(QEMU_2G)
    big["9"] = {"start": "0x100000000", "end": "0x47fffffff", "type": "System RAM"}
    big["8"] = {"start": "0x480000000", "end": "0x4801fffff", "type": "Reserved"}
    assert dl_handler.pmrs(parse_memmap(big)) == dl_handler.Pmrs(
        0, 0x7FE00000, 0x100000000, 0x380000000)


def test_mle_page_table_room():
    # PDPT + PD + one page table per 2 MiB of the kernel segment.
    assert dl_handler.mle_ptab_size(0x1000) == 3 * 4096
    assert dl_handler.mle_ptab_size(2 << 20) == 3 * 4096
    assert dl_handler.mle_ptab_size((2 << 20) + 1) == 4 * 4096
    assert dl_handler.mle_ptab_size(64 << 20) == (2 + 32) * 4096


def test_acm_platform_fit():
    ok = acmfmt.parse(build_acm(fms=0x806F0, caps=0x227))
    ids = {"vendor_id": 0x8086, "device_id": 0xB005, "revision_id": 1}
    assert acmfmt.platform_fit(ok, **ids, production_fused=True, fms=0x806F8).fits
    assert acmfmt.platform_fit(ok, **{**ids, "device_id": 0x4660}, production_fused=True,
                               fms=None).reason == "sinit-acm-mismatch"
    assert acmfmt.platform_fit(ok, **ids, production_fused=False,
                               fms=None).reason == "sinit-acm-fuse-mismatch"
    assert acmfmt.platform_fit(ok, **ids, production_fused=True,
                               fms=0x906A0).reason == "sinit-acm-fuse-mismatch"
    bios = acmfmt.parse(build_acm(acm_type=0))
    assert acmfmt.platform_fit(bios, **ids, production_fused=None,
                               fms=None).reason == "sinit-acm-not-sinit"


def test_os_sinit_capabilities():
    caps = acmfmt.os_sinit_capabilities(acmfmt.parse(build_acm(caps=0x227)).info)
    assert caps == (1 << 5) | (1 << 1) | (1 << 2) | (1 << 9)
    getsec_only = acmfmt.os_sinit_capabilities(acmfmt.parse(build_acm(caps=0x225)).info)
    assert getsec_only & 0x3 == 0x1
    with pytest.raises(acmfmt.InvalidAcm, match="ECX.*TCG TPM 2.0"):
        acmfmt.os_sinit_capabilities(acmfmt.parse(build_acm(caps=0x23)).info)


def test_trusted_files_are_read_by_descriptor(tmp_path):
    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    f = d / "handler.bin"
    f.write_bytes(b"x" * 10)
    assert dl_handler.read_root_file(str(f), 100, "thing") == b"x" * 10
    with pytest.raises(NotReady, match="more than 5"):
        dl_handler.read_root_file(str(f), 5, "thing")
    os.chmod(d, 0o777)
    with pytest.raises(NotReady, match="owned by root and not writable by others"):
        dl_handler.read_root_file(str(f), 100, "thing")
    os.chmod(d, 0o755)
    (d / "link.bin").symlink_to(f)
    # A link is resolved once, then every component opened without following links.
    assert dl_handler.read_root_file(str(d / "link.bin"), 100, "thing") == b"x" * 10
    with pytest.raises(NotReady, match="cannot open"):
        dl_handler.read_root_file(str(d / "missing"), 100, "thing")
