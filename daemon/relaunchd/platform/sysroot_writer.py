"""The one platform writer (platform layer): sysfs attribute stores under a root prefix.

`SysRoot` only reads. Quiescing has to store into sysfs (`cpuN/online`, a driver's
`bind`/`unbind`), and those stores are the most dangerous thing the daemon does on the
host, so they go through this one small object with narrow rules:

- the same root-prefix rule as `SysRoot` (tests point it at a fixture tree), and the live
  root "/" is refused unless the caller says `allow_live=True` (only the shutdown hook and
  the daemon on the target machine do; tests never);
- only paths below /sys, and the directory the attribute lives in must resolve (through
  sysfs's own symlinks, e.g. /sys/bus/pci/devices/BDF) to somewhere below <root>/sys;
- `O_WRONLY|O_NOFOLLOW|O_NONBLOCK` and never `O_CREAT`: only an existing regular file (a
  sysfs attribute) can be written, never a symlink, FIFO or device node, never a new file;
- one value, one write(2) call: a sysfs store sees exactly the buffer of one write.

Fault injection: `fail` is called before every store with (n, path, value), n counting
stores from 1; it may raise an OSError to make that store fail (`FailAt` builds the usual
ones). With `FailAt(..., after=True)` the store happens and *then* fails, as a driver that
changed state but returned an error would.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument

FailHook = Callable[[int, str, str], None]


@dataclass
class FailAt:
    """A failure hook: fail the `nth` store (1-based) and/or any store to `path`."""

    nth: int | None = None
    path: str | None = None
    error: int = errno.EIO
    after: bool = False      # perform the store, then report failure

    def matches(self, n: int, path: str) -> bool:
        if self.nth is not None and n != self.nth:
            return False
        return not (self.path is not None and os.path.normpath(self.path) != path)

    def raise_error(self, path: str) -> None:
        raise OSError(self.error, f"injected failure ({os.strerror(self.error)})", path)

    def __call__(self, n: int, path: str, value: str) -> None:
        if not self.after and self.matches(n, path):
            self.raise_error(path)


class SysWriter:
    """Stores values into existing sysfs attributes below `root` (see module docstring)."""

    def __init__(self, root: str, *, allow_live: bool = False,
                 fail: FailHook | None = None) -> None:
        if not os.path.isdir(root):
            raise InvalidArgument(f"root {root!r} is not a directory")
        self.root = os.path.abspath(root)
        if os.path.realpath(self.root) == "/" and not allow_live:
            raise InvalidArgument("refusing to write to the live /sys without allow_live=True")
        self.fail = fail
        self.count = 0                         # stores attempted
        self.log: list[tuple[str, str]] = []   # stores that reached the file, in order

    def host_path(self, path: str) -> str:
        if not path.startswith("/"):
            raise InvalidArgument(f"platform path must be absolute: {path!r}")
        norm = os.path.normpath(path)
        if not norm.startswith("/sys/"):
            raise InvalidArgument(f"refusing to write outside /sys: {path!r}")
        return norm if self.root == "/" else self.root + norm

    def _check_inside(self, host: str, path: str) -> None:
        sys_dir = os.path.realpath(os.path.join(self.root, "sys"))
        parent = os.path.realpath(os.path.dirname(host))
        if parent != sys_dir and not parent.startswith(sys_dir + "/"):
            raise InvalidArgument(f"{path!r} resolves outside {self.root}/sys")

    def write(self, path: str, value: str) -> None:
        """Store `value` into the attribute `path`; raises OSError as the kernel reports it."""
        host = self.host_path(path)
        norm = os.path.normpath(path)
        self._check_inside(host, path)
        self.count += 1
        n = self.count
        if self.fail is not None:
            self.fail(n, norm, value)
        data = value.encode()
        fd = os.open(host, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a sysfs attribute (regular file)", path)
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)})", path)
        finally:
            os.close(fd)
        self.log.append((norm, value))
        self.stored(norm, value)
        if isinstance(self.fail, FailAt) and self.fail.after and self.fail.matches(n, norm):
            self.fail.raise_error(norm)

    def stored(self, path: str, value: str) -> None:
        """Called after each successful store; a test double overrides it to play the kernel."""
