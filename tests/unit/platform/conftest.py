"""Fixtures of the platform tests: the fixture sysfs tree of tests/support/sysfs_tree.py;
the path-resolution trees and walk modes (tests/support/path_cases.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from relaunchd.platform import path_walk
from support import path_cases
from support.sysfs_tree import build_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "root")


@pytest.fixture(params=["openat2", "ENOSYS", "EPERM"])
def mode(request, monkeypatch) -> str:
    """Every walk test runs three times: with openat2; as on a kernel without it
    (ENOSYS); and as under a seccomp filter that refuses it (EPERM). Without it, each
    step falls back to openat with O_NOFOLLOW."""
    if request.param != "openat2":
        err = getattr(errno, request.param)

        def refused_syscall(dir_fd, name, flags, resolve, mode=0):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(path_walk, "openat2", refused_syscall)
    return request.param


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """allowed/ (root, 0755) holding sub/x.efi; elsewhere/ holding y.efi."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for d in (tmp_path, allowed, allowed / "sub", tmp_path / "elsewhere"):
        os.chmod(d, 0o755)
    for f in (allowed / "sub" / "x.efi", tmp_path / "elsewhere" / "y.efi"):
        f.write_bytes(path_cases.CONTENT)
        os.chmod(f, 0o644)
    return tmp_path
