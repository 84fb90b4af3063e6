"""Crash-safe file updates (relaunchd.platform.atomic_file): a reader sees the old file or
the new one, never half; the data is fsynced before the rename and the directory after it;
a failure leaves the target as it was and no temporary file behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from relaunchd.platform import atomic_file
from relaunchd.platform.atomic_file import atomic_remove, atomic_write


def test_write_creates_and_replaces_with_the_mode_asked(tmp_path):
    target = tmp_path / "record.json"
    old_umask = os.umask(0o077)
    try:
        atomic_write(str(target), b"first\n", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"first\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644     # not narrowed by the umask
    with open(target, "rb") as reader:                       # a reader of the old file
        atomic_write(str(target), b"second, longer\n", mode=0o600)
        assert reader.read() == b"first\n"                   # keeps the old inode whole
    assert target.read_bytes() == b"second, longer\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["record.json"]           # no temporary file left


def test_large_data_is_written_completely(tmp_path):
    data = os.urandom(5 << 20)
    atomic_write(str(tmp_path / "big"), data)
    assert (tmp_path / "big").read_bytes() == data


def test_fsync_of_the_data_before_the_rename_and_of_the_directory_after(tmp_path,
                                                                      monkeypatch):
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def rename(src, dst):
        events.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(atomic_file.os, "fsync", fsync)
    monkeypatch.setattr(atomic_file.os, "rename", rename)
    atomic_write(str(tmp_path / "x"), b"data")
    assert events == ["fsync file", "rename", "fsync dir"]
    events.clear()
    assert atomic_remove(str(tmp_path / "x")) is True
    assert events == ["fsync dir"]


def test_a_failed_write_changes_nothing(tmp_path, monkeypatch):
    target = tmp_path / "record"
    target.write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_file.os, "write", full)
    with pytest.raises(OSError) as info:
        atomic_write(str(target), b"new")
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["record"]


def test_a_missing_directory_is_an_error_that_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(str(tmp_path / "nope" / "record"), b"x")
    assert os.listdir(tmp_path) == []


def test_a_process_killed_before_the_rename_leaves_the_old_file(tmp_path):
    target = tmp_path / "record"
    target.write_bytes(b"old")
    code = ("import os, sys\n"
            "from relaunchd.platform import atomic_file\n"
            "atomic_file.os.rename = lambda a, b: os._exit(9)\n"
            "atomic_file.atomic_write(sys.argv[1], b'new')\n")
    child = subprocess.run([sys.executable, "-c", code, str(target)], timeout=60)
    assert child.returncode == 9
    assert target.read_bytes() == b"old"
    leftovers = [n for n in os.listdir(tmp_path) if n != "record"]
    # the temporary file names itself, so readers that open only the final name (and the
    # state store's clean-up) can tell it apart
    assert len(leftovers) == 1 and leftovers[0].startswith(".record" + atomic_file.TEMP_MARK)


def test_remove(tmp_path):
    target = tmp_path / "record"
    target.write_bytes(b"x")
    assert atomic_remove(str(target)) is True and not target.exists()
    assert atomic_remove(str(target)) is False
