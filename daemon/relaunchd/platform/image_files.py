"""Image files on disk: where they may come from, and opening them safely (platform layer).

Staging, `inspect` and `verify` read UKIs (and add-ons) that an update tool or an admin
names by path. An image is accepted only inside an allowed directory below which nothing is
writable by non-root (`check_location`), and opened as a regular file only: no symlinks
unless asked, never blocking on a FIFO, never opening a device (`open_regular`).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from relaunchd.errors import InvalidImage
from relaunchd.formats import uki

DEFAULT_IMAGE_DIRS = ("/boot", "/efi", "/boot/efi", "/usr/lib/kernel", "/var/lib/relaunchd/images")


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from. Each allowed directory is trusted as
    configured; below it, nothing on the path may be writable by non-root."""

    allowed_dirs: tuple[str, ...]
    follow_symlinks: bool = False


def check_location(path: str, policy: ImagePolicy) -> str:
    """The resolved path if it lies inside an allowed directory and no
    component below that directory is writable by anyone but root."""
    real = os.path.realpath(path)
    if not policy.follow_symlinks and os.path.islink(path):
        raise InvalidImage(f"{path}: is a symbolic link (refused)")
    for allowed in policy.allowed_dirs:
        base = os.path.realpath(allowed)
        if real == base or not real.startswith(base.rstrip("/") + "/"):
            continue
        current = real
        while True:
            try:
                st = os.lstat(current)
            except OSError as exc:
                raise InvalidImage(f"{path}: cannot check {current}: {exc.strerror}") from None
            if st.st_uid != 0:
                raise InvalidImage(f"{path}: {current} is owned by uid {st.st_uid}, not root")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise InvalidImage(f"{path}: {current} is writable by non-root users")
            if current == base:
                return real
            current = os.path.dirname(current)
    raise InvalidImage(f"{path}: not inside an allowed image directory "
                       f"({', '.join(policy.allowed_dirs) or 'none configured'})")


def open_image(
    path: str,
    *,
    follow_symlinks: bool = False,
    machine: int | None = None,
    confirm: bool = True,
) -> uki.UkiImage:
    """Open a UKI file safely: regular files only, no symlinks unless asked,
    never blocking on a FIFO, never opening a device. `confirm=False` defers the
    pefile cross-check to `UkiImage.confirm_headers()` (inspect_image runs it while
    it hashes)."""
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        return uki.from_fd(fd, path, machine=machine, owns_fd=True, confirm=confirm)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str, *, follow_symlinks: bool = False) -> int:
    """A read-only descriptor of a regular file (the caller closes it): no symlinks
    unless asked, never blocking on a FIFO, never opening a device."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise InvalidImage(f"{path}: no such file") from None
    except PermissionError:
        raise InvalidImage(f"{path}: permission denied") from None
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot stat: {exc.strerror}") from None
    _require_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidImage(f"{path}: is a symbolic link (refused)") from None
        raise InvalidImage(f"{path}: cannot open: {exc.strerror}") from None
    try:
        # Re-check on the descriptor: the path may have been swapped meanwhile.
        _require_regular(path, os.fstat(fd).st_mode)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _require_regular(path: str, mode: int) -> None:
    kinds = (
        (stat.S_ISLNK, "a symbolic link (refused)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    for test, what in kinds:
        if test(mode):
            raise InvalidImage(f"{path}: is {what}, not a regular file")
    if not stat.S_ISREG(mode):
        raise InvalidImage(f"{path}: is not a regular file")
