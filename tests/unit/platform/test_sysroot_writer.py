"""The one sysfs writer (relaunchd.platform.sysroot_writer) on a fixture tree: the live root
refused, only existing regular attributes below <root>/sys, and the fault hooks.

Nothing here writes to the host's /sys: every `SysWriter` is rooted in a tmp tree (and
refuses "/")."""

from __future__ import annotations

import errno
import os

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.platform.sysroot_writer import FailAt, SysWriter


def test_writer_refuses_live_root_and_outside_sys(tree, tmp_path):
    with pytest.raises(InvalidArgument):
        SysWriter("/")
    with pytest.raises(InvalidArgument):
        SysWriter(str(tree / ".." / ".." / ".." / ".." / ".." / ".." / ".." / ".."))
    w = SysWriter(str(tree))
    for bad in ("/proc/sys/kernel/sysrq", "/dev/tpm0", "/sys/../etc/x", "sys/kernel/x", "/sys"):
        with pytest.raises(InvalidArgument):
            w.write(bad, "1")
    assert w.log == []


def test_writer_only_existing_regular_attributes(tree, tmp_path):
    w = SysWriter(str(tree))
    with pytest.raises(FileNotFoundError):            # no O_CREAT
        w.write("/sys/devices/system/cpu/cpu0/online", "0")
    assert not (tree / "sys/devices/system/cpu/cpu0/online").exists()
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (tree / "sys/kernel/link").symlink_to(outside)
    with pytest.raises(OSError) as info:               # O_NOFOLLOW on the last component
        w.write("/sys/kernel/link", "x")
    assert info.value.errno == errno.ELOOP
    (tree / "sys/escape").symlink_to(tmp_path)          # a directory link out of <root>/sys
    with pytest.raises(InvalidArgument):
        w.write("/sys/escape/outside", "x")
    assert outside.read_text() == "keep\n"
    os.mkfifo(tree / "sys/kernel/fifo")
    with pytest.raises(OSError):                        # never blocks on a FIFO
        w.write("/sys/kernel/fifo", "x")


def test_writer_through_sysfs_symlinks_and_fault_hooks(tree):
    w = SysWriter(str(tree), fail=FailAt(nth=2))
    w.write("/sys/bus/pci/devices/0000:00:03.0/driver/unbind", "0000:00:03.0")
    assert (tree / "sys/bus/pci/drivers/virtio-net/unbind").read_text() == "0000:00:03.0"
    with pytest.raises(OSError, match="injected"):
        w.write("/sys/devices/system/cpu/cpu1/online", "0")
    assert (tree / "sys/devices/system/cpu/cpu1/online").read_text() == "1\n"
    w.write("/sys/devices/system/cpu/cpu1/online", "0")
    assert w.count == 3 and len(w.log) == 2
    w2 = SysWriter(str(tree), fail=FailAt(path="/sys/devices/system/cpu/cpu2/online",
                                          error=errno.EBUSY, after=True))
    with pytest.raises(OSError) as info:
        w2.write("/sys/devices/system/cpu/cpu2/online", "0")
    assert info.value.errno == errno.EBUSY
    assert (tree / "sys/devices/system/cpu/cpu2/online").read_text() == "0"


