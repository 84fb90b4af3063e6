"""Sealed memfds (relaunchd.platform.sealed_memfd): what was copied is what stays — the
seals F_SEAL_WRITE|GROW|SHRINK|SEAL (memfd_create(2), fcntl(2) "File Sealing") hold against
writes, resizes and the file changing on disk; a split copy detaches one range."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.platform import sealed_memfd

# include/uapi/linux/fcntl.h
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def source(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 4096 + 77)
    path = tmp_path / "image.efi"
    path.write_bytes(data)
    return path, data


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def test_the_seals_are_the_four_the_kernel_defines():
    assert sealed_memfd.SEALS == F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE


def test_a_sealed_copy_cannot_change(source):
    path, data = source
    src = os.open(path, os.O_RDONLY)
    try:
        fd = sealed_memfd.sealed_copy(src, "image", expected_size=len(data))
    finally:
        os.close(src)
    try:
        assert read_all(fd) == data
        assert sealed_memfd.is_sealed(fd)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == sealed_memfd.SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:relaunchd:image")
        for attempt in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, 10),
                        lambda: os.ftruncate(fd, len(data) + 10),
                        lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EPERM
        path.write_bytes(b"replaced on disk")            # the file changes afterwards
        assert read_all(fd) == data
    finally:
        os.close(fd)


def test_a_file_that_changed_size_is_refused(source):
    path, data = source
    src = os.open(path, os.O_RDONLY)
    before = open_fds()
    try:
        with pytest.raises(InvalidImage, match="changed size"):
            sealed_memfd.sealed_copy(src, "image", expected_size=len(data) - 1)
    finally:
        os.close(src)
    assert open_fds() <= before | {str(src)}


@pytest.mark.parametrize(("start", "length"), [(4096, 5000), (0, 100), (3 * 4096, 77),
                                                (100, 0)])
def test_a_split_copy_detaches_one_range(source, start, length):
    path, data = source
    src = os.open(path, os.O_RDONLY)
    try:
        fd, part = sealed_memfd.split_copy(src, "image", detach=(start, length))
    finally:
        os.close(src)
    try:
        expected = data[:start] + bytes(length) + data[start + length:]
        assert read_all(fd) == expected and sealed_memfd.is_sealed(fd)
        assert read_all(part) == data[start:start + length]
        assert not sealed_memfd.is_sealed(part)          # the caller finishes it
        assert os.lseek(part, 0, os.SEEK_CUR) == length  # ready to append
        os.write(part, b"appended")
        sealed_memfd.seal(part)
        assert sealed_memfd.is_sealed(part)
    finally:
        os.close(fd)
        os.close(part)


def test_a_detached_range_outside_the_file_leaves_nothing_open(source):
    path, data = source
    src = os.open(path, os.O_RDONLY)
    before = open_fds()
    try:
        with pytest.raises(ValueError):
            sealed_memfd.split_copy(src, "image", detach=(len(data) - 10, 11))
    finally:
        os.close(src)
    assert open_fds() <= before


def test_a_source_shorter_than_its_range_is_named(source):
    path, data = source
    src = os.open(path, os.O_RDONLY)
    dst = sealed_memfd.create("dst")
    try:
        with pytest.raises(InvalidImage, match="shrank"):
            sealed_memfd.copy_range(src, len(data) - 10, 100, dst)
    finally:
        os.close(src)
        os.close(dst)


def test_only_a_fully_sealed_memfd_counts_as_sealed(source):
    path, _ = source
    regular = os.open(path, os.O_RDONLY)
    partly = sealed_memfd.create("partly")
    try:
        assert not sealed_memfd.is_sealed(regular)       # not a memfd at all
        fcntl.fcntl(partly, fcntl.F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK)
        assert not sealed_memfd.is_sealed(partly)
    finally:
        os.close(regular)
        os.close(partly)
