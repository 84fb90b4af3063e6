"""Read a volume's LUKS2 header from its device, read-only and bounded (platform layer).

The device is opened below the root prefix by descriptor: `path_walk` walks it with
`in_root` (every step by openat2/O_NOFOLLOW; device links such as
/dev/disk/by-uuid/X → ../../vdc, or an absolute /dev/vdc, followed inside the root and only
when root or the caller owns them, in a directory nobody else may change), and the entry
it reaches is opened relative to its directory. It must be a block device (or, in fixture
trees and for image files, a regular file), and only the header area is read: the primary
copy (hdr_size, at most 4 MiB) and the secondary right after it; if the primary does not
verify, the secondary is looked for at every offset the format allows (formats.luks2,
spec Table 2).
"""

from __future__ import annotations

import os
import stat

from relaunchd.errors import InvalidVolume
from relaunchd.formats import luks2
from relaunchd.platform import path_walk

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class DeviceNotOpened(InvalidVolume):
    """The device path could not be walked or opened (missing, a link leading nowhere
    or refused, too many links): the crypttab entry, not the header, is at fault."""


def open_device(root: str, device: str) -> tuple[int, str]:
    """Open `device` (absolute, as seen from `root`) read-only below `root`; the
    descriptor and the path it resolved to (as seen from `root`). Raises
    DeviceNotOpened."""
    if not device.startswith("/"):
        raise DeviceNotOpened(f"{device}: not an absolute path")
    rules = path_walk.Rules(path_walk.trusted_uids(), "trusted", check_directories=False)
    with path_walk.walk(device, rules, DeviceNotOpened, path_walk.in_root(root)) as resolved:
        fd, _ = path_walk.open_entry(resolved, OPEN_FLAGS, DeviceNotOpened)
        return fd, path_walk.below(root, resolved.path)


def read_header(root: str, device: str) -> tuple[luks2.Luks2Header, str]:
    """The current LUKS2 header of `device` (a path as seen from `root`) and the
    device node it resolved to. Raises DeviceNotOpened, InvalidVolume (not LUKS2,
    corrupt) or OSError (a failed read)."""
    fd, resolved = open_device(root, device)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise InvalidVolume(f"{device} ({resolved}) is not a block device")
        return _current_header(fd, device), resolved
    finally:
        os.close(fd)


def _current_header(fd: int, device: str) -> luks2.Luks2Header:
    head = os.pread(fd, luks2.BINARY_HEADER_SIZE, 0)
    version = luks2.luks_version(head)
    if version is None:
        raise InvalidVolume(f"{device}: no LUKS header")
    if version != 2:
        raise InvalidVolume(f"{device}: LUKS{version}, not LUKS2: no tokens to unlock with")
    copies: list[luks2.Luks2Header] = []
    problems: list[str] = []
    primary_size = None
    try:
        primary_size = luks2.parse_binary(head).hdr_size
        copies.append(luks2.parse_copy(os.pread(fd, primary_size, 0), 0))
    except InvalidVolume as exc:
        problems.append(f"primary: {exc}")
    offsets = (primary_size,) if copies and primary_size else luks2.HEADER_SIZES
    for offset in offsets:
        area = os.pread(fd, luks2.BINARY_HEADER_SIZE, offset)
        if area[:6] != luks2.MAGIC_SECONDARY:
            continue
        try:
            size = luks2.parse_binary(area).hdr_size
            copies.append(luks2.parse_copy(os.pread(fd, size, offset), offset))
            break
        except InvalidVolume as exc:
            problems.append(f"secondary at {offset}: {exc}")
    if not copies:
        raise InvalidVolume(f"{device}: no valid LUKS2 header ({'; '.join(problems)})")
    return luks2.current(copies)
