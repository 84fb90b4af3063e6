"""platform.path_walk: each step of a walk by descriptor — the kernel as the oracle for the
openat2 constants (RESOLVE_NO_SYMLINKS refuses a link with ELOOP, RESOLVE_BENEATH a \"..\"
with EXDEV, as openat2(2) says), and a link swapped in after a step's check."""

from __future__ import annotations

import errno
import os

import pytest

from relaunchd.platform import path_walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")

# ---------------------------------------------------------------- the kernel as oracle


def test_openat2_constants_are_the_kernels(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "f")
    top = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        fd = path_walk.openat2(top, "../f", os.O_RDONLY | os.O_CLOEXEC, 0)
        os.close(fd)            # no RESOLVE_* flag: an ordinary openat
        with pytest.raises(OSError) as info:
            path_walk.openat2(top, "../f", os.O_RDONLY, path_walk.RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV
        with pytest.raises(OSError) as info:
            path_walk.openat2(top, "link", os.O_RDONLY, path_walk.RESOLVE_NO_SYMLINKS)
        assert info.value.errno == errno.ELOOP
        fd = path_walk.openat2(top, "link", os.O_RDONLY | os.O_CLOEXEC, 0)
        assert os.read(fd, 1) == b"x"
        os.close(fd)
    finally:
        os.close(top)


def test_each_step_refuses_a_link_swapped_in_after_the_check(tmp_path, mode, monkeypatch):
    """What the lstat of a step saw may be replaced before the step opens it: openat2's
    RESOLVE_NO_SYMLINKS, or O_NOFOLLOW in the fallback, refuses the link then."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "flink").symlink_to(tmp_path / "f")
    calls: list[str] = []
    real_openat2 = path_walk.openat2

    def counting(dir_fd, name, flags, resolve, mode=0):
        calls.append(name)
        return real_openat2(dir_fd, name, flags, resolve, mode)

    monkeypatch.setattr(path_walk, "openat2", counting)
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            path_walk.open_step(top, "link", path_walk.DIRECTORY_FLAGS)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        with pytest.raises(OSError) as info:
            path_walk.open_step(top, "flink", path_walk.READ_FLAGS)
        assert info.value.errno == errno.ELOOP
        os.close(path_walk.open_step(top, "real", path_walk.DIRECTORY_FLAGS))
        with pytest.raises(ValueError):
            path_walk.open_step(top, "real/..", path_walk.DIRECTORY_FLAGS)
    finally:
        os.close(top)
    assert calls == ["link", "flink", "real"]      # every mode tries openat2 first


