"""The one platform reader (relaunchd.platform.sysroot): root prefix, bounds, no blocking,
why-not."""

from __future__ import annotations

import gzip
import os

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.platform import sysroot
from relaunchd.platform.sysroot import SysRoot


def test_root_prefix_and_no_escape(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("quiet\n")
    r = SysRoot(str(tmp_path))
    assert r.read_line("/proc/cmdline").value == "quiet"
    assert r.host_path("/../../etc/passwd") == f"{tmp_path}/etc/passwd"
    with pytest.raises(ValueError):
        r.host_path("proc/cmdline")
    with pytest.raises(InvalidArgument):
        SysRoot(str(tmp_path / "missing"))


def test_reasons(tmp_path):
    r = SysRoot(str(tmp_path))
    (tmp_path / "num").write_text("0x1f\n")
    (tmp_path / "bad").write_text("twelve\n")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "big").write_bytes(b"x" * (sysroot.DEFAULT_LIMIT + 1))
    assert r.read_int("/num").value == 31
    assert r.read_int("/bad").error == sysroot.GARBAGE
    assert r.read_text("/bin").error == sysroot.GARBAGE
    assert r.read_bytes("/big").error == sysroot.TOO_LARGE
    assert r.read_prefix("/big", 10).value == "x" * 10
    assert r.read_line("/nope").error == sysroot.NOT_PRESENT
    assert r.read_line("/num/below").error == sysroot.NOT_PRESENT
    assert r.listdir("/num").error == sysroot.NOT_PRESENT
    assert r.readlink("/num").error == sysroot.GARBAGE
    (tmp_path / "dir").mkdir()
    assert r.read_text("/dir").error in (sysroot.NOT_REGULAR, sysroot.UNREADABLE)


def test_permission(tmp_path, monkeypatch):
    (tmp_path / "secret").write_text("1\n")
    os.chmod(tmp_path / "secret", 0)
    if os.geteuid() == 0:   # root ignores file modes: make the open fail as it would for a user
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(sysroot.os, "open", denied)
    got = SysRoot(str(tmp_path)).read_int("/secret")
    assert (got.error, got.detail) == (sysroot.PERMISSION, "Permission denied")


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")       # opening it for reading would block without O_NONBLOCK
    r = SysRoot(str(tmp_path))
    assert r.read_text("/fifo").error == sysroot.NOT_REGULAR
    assert r.read_at("/fifo", 0, 8).error == sysroot.NOT_REGULAR


def test_read_at_sparse_and_short(tmp_path):
    with open(tmp_path / "mem", "wb") as f:
        f.seek(0xFED30000)
        f.write(b"\x02" + b"\x00" * 7)
    r = SysRoot(str(tmp_path))
    assert r.read_at("/mem", 0xFED30000, 8).value == b"\x02" + bytes(7)
    short = r.read_at("/mem", 0xFED30004, 8)
    assert short.error == sysroot.GARBAGE and "short read" in short.detail
    assert r.read_at("/mem", 0, sysroot.DEFAULT_LIMIT + 1).error == sysroot.TOO_LARGE


def test_read_at_accepts_char_devices_only_there():
    r = SysRoot("/")
    assert r.read_at("/dev/zero", 4096, 8).value == bytes(8)
    assert r.read_bytes("/dev/zero").error == sysroot.NOT_REGULAR


def test_gzip_bounds(tmp_path):
    (tmp_path / "config.gz").write_bytes(gzip.compress(b"CONFIG_KEXEC=y\n"))
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(b"\0" * (2 << 20)))
    (tmp_path / "junk.gz").write_bytes(b"not gzip")
    r = SysRoot(str(tmp_path))
    assert r.read_gzip_text("/config.gz").value == "CONFIG_KEXEC=y\n"
    assert r.read_gzip_text("/bomb.gz", limit=1 << 20).error == sysroot.TOO_LARGE
    assert r.read_gzip_text("/junk.gz").error == sysroot.GARBAGE
