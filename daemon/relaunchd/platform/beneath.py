"""Open a path below a root directory by descriptor (platform layer).

Device links such as /dev/disk/by-uuid/X are symbolic links, and under `--root`
their targets ("../../vdc", or an absolute "/dev/vdc") must be taken relative to
the root, never the host's. So the path is walked one component at a time with
openat(O_PATH|O_NOFOLLOW) from a descriptor of the root; a symbolic link is read
with readlinkat and its target walked the same way (absolute ones from the root
again), ".." never climbs above the root, and the last component is opened with
O_NOFOLLOW. No path string is ever resolved by the kernel in one go, so no link
can lead outside the root. The same walk as openat2(RESOLVE_IN_ROOT), which
Python does not offer.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

MAX_LINKS = 40            # as the kernel's own limit (MAXSYMLINKS)


def open_beneath(root: str, path: str, flags: int = os.O_RDONLY) -> tuple[int, str]:
    """Open `path` (absolute, as seen from `root`) below `root`; returns the descriptor
    and the path it resolved to (as seen from `root`). Raises OSError."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, f"not an absolute path: {path!r}")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, str]] = [(root_fd, "")]
    parts = deque(path.split("/"))
    links = 0
    try:
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            dir_fd, where = stack[-1]
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                mode = os.fstat(fd).st_mode
            except BaseException:
                os.close(fd)
                raise
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, f"too many symbolic links in {path!r}")
                target = os.readlink(name, dir_fd=dir_fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                parts.extendleft(reversed(target.split("/")))
                continue
            if parts and any(p not in ("", ".") for p in parts):
                if not stat.S_ISDIR(mode):
                    os.close(fd)
                    raise OSError(errno.ENOTDIR, f"{where}/{name} is not a directory")
                stack.append((fd, f"{where}/{name}"))
                continue
            os.close(fd)
            # The last component: opened for real, still refusing a link swapped in.
            return (os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                            dir_fd=dir_fd), f"{where}/{name}")
        raise OSError(errno.EISDIR, f"{path!r} names the root itself")
    finally:
        for fd, _ in stack:
            os.close(fd)

