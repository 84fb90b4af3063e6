"""The stage-time pieces of a TXT launch (relaunchd.launch.dl_handler) that need no
emulator: the PMRs from the memory map, the MLE page-table room, the ACM's fit to the
platform, the OS-to-SINIT capabilities and the trusted reads by descriptor. The handler
running up to GETSEC[SENTER] is tests/integration/test_dl_handler_emulated.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.platforms.build import build_acm
from relaunchd.errors import NotReady
from relaunchd.formats import acm as acmfmt
from relaunchd.launch import dl_handler
from relaunchd.platform.memory_map import parse_memmap
from support.memmaps import QEMU_2G

REPO = Path(__file__).resolve().parents[3]
ABI_H = REPO / "daemon/relaunchd/launch/dl_handler/abi.h"
BUILT = REPO / "build/dl-handler/txt-dl-handler.bin"
needs_build = pytest.mark.skipif(not BUILT.exists(), reason="run `make setup`")



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
