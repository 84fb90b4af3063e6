"""The firmware memory map read from /sys/firmware/memmap under a root prefix
(relaunchd.platform.memory_map), on fixture trees written as the kernel lays them out."""

from __future__ import annotations

import pytest

from relaunchd.errors import Unsupported
from relaunchd.formats.x86 import memory_ranges as mm
from relaunchd.platform.memory_map import read_memmap
from relaunchd.platform.sysroot import SysRoot
from support.memmaps import QEMU_2G, write_memmap


def test_read_memmap_through_sysroot(tmp_path):
    write_memmap(tmp_path, QEMU_2G)
    assert read_memmap(SysRoot(str(tmp_path))) == mm.parse_memmap(QEMU_2G)


def test_read_memmap_missing(tmp_path):
    with pytest.raises(Unsupported, match="CONFIG_FIRMWARE_MEMMAP"):
        read_memmap(SysRoot(str(tmp_path)))
    (tmp_path / "sys/firmware/memmap/0").mkdir(parents=True)
    with pytest.raises(Unsupported, match="start"):
        read_memmap(SysRoot(str(tmp_path)))
