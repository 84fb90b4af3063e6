"""One reader for every platform path, under one root prefix (platform layer).

Every /proc, /sys, /dev, /boot, /etc and /run path the daemon looks at goes
through a `SysRoot`, so tests point it at a fixture tree and the real host
uses "/". Reads never raise for the ordinary ways a fact can be missing: they
return a `Read` that says why (not present, permission, garbage, ...), so the
probe can report "unknown, because ..." instead of crashing.

Reads are bounded (sysfs/procfs attributes are at most a page; a hostile or
surprising file must not make us slurp gigabytes) and never wait: files are
opened O_NONBLOCK and anything that is not a regular file (a FIFO, a socket,
a tty) is refused, except that `read_at` also accepts character devices,
because /dev/mem and /dev/cpu/N/msr are the only way to see TXT registers and
MSRs (drtm.md §3.1, §3.2).

This module only reads. Writers (quiesce) get their own object later.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import zlib
from dataclasses import dataclass
from typing import Generic, TypeVar

from relaunchd.errors import InvalidArgument

T = TypeVar("T")

# Why a fact could not be read. Stable strings: they appear in `check --json`.
NOT_PRESENT = "not-present"
PERMISSION = "permission"
GARBAGE = "garbage"          # present and readable, but not what the format says
TOO_LARGE = "too-large"
NOT_REGULAR = "not-regular"  # a FIFO/socket/device where a plain file was expected
UNREADABLE = "unreadable"    # any other I/O error (EIO, EINVAL from a driver, ...)

DEFAULT_LIMIT = 64 << 10     # a sysfs attribute is one page; leave room for procfs lists
CONFIG_GZ_LIMIT = 8 << 20    # decompressed /proc/config.gz is ~250 KiB; cap it anyway


@dataclass(frozen=True)
class Read(Generic[T]):
    """The outcome of reading one platform path."""

    path: str                # the path as the platform sees it ("/sys/..."), not the host path
    value: T | None = None
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _errno_kind(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENXIO, errno.ENODEV):
        return NOT_PRESENT
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PERMISSION
    return UNREADABLE


class SysRoot:
    """Reads platform paths below `root` (bounded, non-blocking, never raising on I/O)."""

    def __init__(self, root: str = "/") -> None:
        if not os.path.isdir(root):
            raise InvalidArgument(f"root {root!r} is not a directory")
        self.root = os.path.abspath(root)

    def host_path(self, path: str) -> str:
        """The real path of platform path `path` (which must be absolute)."""
        if not path.startswith("/"):
            raise ValueError(f"platform path must be absolute: {path!r}")
        norm = os.path.normpath(path)
        if self.root == "/":
            return norm
        return self.root + norm

    # The one place files are opened: tests wrap it to see what was touched.
    def _open(self, path: str, allow_chardev: bool = False) -> int:
        fd = os.open(self.host_path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or (allow_chardev and stat.S_ISCHR(mode))):
                raise _NotRegular(path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> Read[bytes]:
        try:
            fd = self._open(path)
        except _NotRegular:
            return Read(path, error=NOT_REGULAR, detail="not a regular file")
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        try:
            chunks: list[bytes] = []
            total = 0
            # sysfs attributes report st_size 4096 whatever they hold, so read to EOF.
            while total <= limit:
                chunk = os.read(fd, min(65536, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        finally:
            os.close(fd)
        if total > limit:
            return Read(path, error=TOO_LARGE, detail=f"larger than {limit} bytes")
        return Read(path, b"".join(chunks))

    def read_text(self, path: str, limit: int = DEFAULT_LIMIT) -> Read[str]:
        raw = self.read_bytes(path, limit)
        if not raw.ok or raw.value is None:
            return Read(path, error=raw.error, detail=raw.detail)
        try:
            return Read(path, raw.value.decode("utf-8"))
        except UnicodeDecodeError:
            return Read(path, error=GARBAGE, detail="not UTF-8 text")

    def read_prefix(self, path: str, size: int) -> Read[str]:
        """The first `size` bytes as text, for files whose head is all we need (cpuinfo)."""
        try:
            fd = self._open(path)
        except _NotRegular:
            return Read(path, error=NOT_REGULAR, detail="not a regular file")
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        try:
            data = os.read(fd, min(size, DEFAULT_LIMIT))
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        finally:
            os.close(fd)
        return Read(path, data.decode("utf-8", "replace"))

    def read_line(self, path: str) -> Read[str]:
        """The first line of a one-value attribute, stripped."""
        text = self.read_text(path)
        if not text.ok or text.value is None:
            return text
        return Read(path, text.value.strip().split("\n", 1)[0].strip())

    def read_int(self, path: str, base: int = 0) -> Read[int]:
        """An integer attribute; base 0 accepts "12", "0x1f", "0o7"."""
        line = self.read_line(path)
        if not line.ok or line.value is None:
            return Read(path, error=line.error, detail=line.detail)
        try:
            return Read(path, int(line.value, base))
        except ValueError:
            return Read(path, error=GARBAGE, detail=f"not an integer: {line.value[:40]!r}")

    def read_at(self, path: str, offset: int, size: int) -> Read[bytes]:
        """Exactly `size` bytes at `offset` of a file or character device (/dev/mem, msr)."""
        if size > DEFAULT_LIMIT:
            return Read(path, error=TOO_LARGE, detail=f"{size} bytes requested")
        try:
            fd = self._open(path, allow_chardev=True)
        except _NotRegular:
            return Read(path, error=NOT_REGULAR, detail="not a regular file or device")
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)
        finally:
            os.close(fd)
        if len(data) != size:
            return Read(path, error=GARBAGE,
                        detail=f"short read: {len(data)} of {size} bytes at 0x{offset:x}")
        return Read(path, data)

    def read_gzip_text(self, path: str, limit: int = CONFIG_GZ_LIMIT) -> Read[str]:
        """A gzip file such as /proc/config.gz, with the decompressed size capped."""
        raw = self.read_bytes(path, limit=limit)
        if not raw.ok or raw.value is None:
            return Read(path, error=raw.error, detail=raw.detail)
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw.value)) as gz:
                data = gz.read(limit + 1)
        except (OSError, EOFError, zlib.error) as exc:
            return Read(path, error=GARBAGE, detail=f"bad gzip: {exc}")
        if len(data) > limit:
            return Read(path, error=TOO_LARGE, detail=f"decompresses to over {limit} bytes")
        return Read(path, data.decode("utf-8", "replace"))

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.host_path(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self.host_path(path))

    def listdir(self, path: str) -> Read[list[str]]:
        try:
            return Read(path, sorted(os.listdir(self.host_path(path))))
        except NotADirectoryError:
            return Read(path, error=NOT_PRESENT, detail="not a directory")
        except OSError as exc:
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)

    def readlink(self, path: str) -> Read[str]:
        try:
            return Read(path, os.readlink(self.host_path(path)))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return Read(path, error=GARBAGE, detail="not a symbolic link")
            return Read(path, error=_errno_kind(exc), detail=exc.strerror)


class _NotRegular(Exception):
    pass
