"""Sealed memfds: what was verified is what gets loaded (platform layer).

Staging opens the image once, copies it into a memfd and seals it
(F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL) before anything is
parsed or verified; the kernel and initrd given to kexec are memfds built
from that copy and sealed too. Replacing or rewriting the file on disk after
this point changes nothing. Copies run in the kernel (sendfile), never
through Python buffers.

`split_copy` is the same copy with one range (a UKI's `.initrd`) written to a
memfd of its own instead: that memfd becomes the initrd handed to kexec, so
the 100 MB of an initrd are copied once, not twice.
"""

from __future__ import annotations

import errno
import fcntl
import os

from relaunchd.errors import InvalidImage

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def create(name: str) -> int:
    return os.memfd_create(f"relaunchd:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def seal(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def is_sealed(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    except OSError:
        return False


def copy_range(src_fd: int, offset: int, length: int, dst_fd: int) -> None:
    """Write [offset, offset+length) of src at dst's file position, in the kernel."""
    while length:
        sent = os.sendfile(dst_fd, src_fd, offset, min(length, 1 << 30))
        if sent <= 0:
            raise InvalidImage(f"file shrank while copying (at offset {offset})")
        offset += sent
        length -= sent


def sealed_copy(src_fd: int, name: str, expected_size: int | None = None) -> int:
    """A sealed memfd holding the whole of `src_fd` as it is now."""
    fd, _ = split_copy(src_fd, name, expected_size)
    return fd


def split_copy(src_fd: int, name: str, expected_size: int | None = None,
               detach: tuple[int, int] | None = None) -> tuple[int, int | None]:
    """Copy `src_fd` as it is now into a memfd and seal it. With `detach=(offset,
    length)` that range goes to a second memfd instead (at 0, its file position
    left at the end so the caller can append) and reads as zeros in the first;
    the second is left unsealed for the caller to finish and seal."""
    size = os.fstat(src_fd).st_size
    if expected_size is not None and size != expected_size:
        raise InvalidImage(f"{name}: changed size while staging")
    hole_start, hole_length = detach if detach is not None else (size, 0)
    if hole_start < 0 or hole_length < 0 or hole_start + hole_length > size:
        raise ValueError("detached range outside the file")
    fd = create(name)
    part = create(f"{name}.part") if detach is not None else None
    try:
        try:
            copy_range(src_fd, 0, hole_start, fd)
            if part is not None:
                copy_range(src_fd, hole_start, hole_length, part)
            os.lseek(fd, hole_start + hole_length, os.SEEK_SET)
            copy_range(src_fd, hole_start + hole_length, size - hole_start - hole_length, fd)
            os.ftruncate(fd, size)     # a hole at the very end leaves the file short
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InvalidImage(f"{name}: no memory for a {size}-byte copy") from None
            raise
        if os.fstat(fd).st_size != size or (
                part is not None and os.fstat(part).st_size != hole_length):
            raise InvalidImage(f"{name}: copy is incomplete")
        seal(fd)
        return fd, part
    except BaseException:
        os.close(fd)
        if part is not None:
            os.close(part)
        raise
