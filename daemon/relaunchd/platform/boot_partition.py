"""The ESP and XBOOTLDR partitions, found and read like bootctl and systemd-boot do
(platform layer).

Finding them (bootctl 252, src/shared/find-esp.c): the ESP is the first of `/efi`,
`/boot`, `/boot/efi` that is the root of a FAT file system whose partition, when udev
knows it, has the ESP type (GPT c12a7328-…, MBR 0xef); XBOOTLDR is `/boot` when it is a
file system root on a partition of the XBOOTLDR type (GPT bc13c2ff-…, MBR 0xea) and not
the ESP's device. Mount facts come from `/proc/self/mountinfo` and partition types from
udev's database (`/run/udev/data/b<major>:<minor>`, as bootctl's unprivileged path
does), both read under the root prefix, so a fixture tree can stand in for a machine.
Configured paths (relaunchd.yaml, tests) are taken as they are, like bootctl's
`--esp-path`/`--boot-path`.

Reading them: the partition root is opened once, component by component with
O_NOFOLLOW, and every file below it is reached the same way (openat per component,
O_NOFOLLOW), must be on the same file system (st_dev) and a regular file, and is
read with a size limit. A symbolic link or a mount point inside the partition is
refused, never followed: a boot loader reading a FAT partition sees neither.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument
from relaunchd.platform.sysroot import SysRoot

ESP_GPT_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
XBOOTLDR_GPT_TYPE = "bc13c2ff-59e6-4262-a352-b275fd6f7172"
ESP_MBR_TYPE = "0xef"
XBOOTLDR_MBR_TYPE = "0xea"
ESP_CANDIDATES = ("/efi", "/boot", "/boot/efi")       # find_esp_and_warn's order
XBOOTLDR_CANDIDATES = ("/boot",)
MOUNTINFO = "/proc/self/mountinfo"
MAX_DIRECTORY_ENTRIES = 4096


@dataclass(frozen=True)
class Partition:
    role: str          # "esp" | "xbootldr"
    path: str          # platform path of its root ("/boot/efi")
    found_by: str      # how: "configured", "mount point (vfat, GPT ESP)", ...


@dataclass(frozen=True)
class Mount:
    point: str
    device: tuple[int, int]
    fstype: str


class PartitionError(Exception):
    """A file below a partition that cannot be read safely. `reason` is one of the
    formats.boot_entries problem reasons (unreadable, not-regular-file, too-large)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_mountinfo(text: str) -> list[Mount]:
    """proc(5) mountinfo lines: field 3 is major:minor, 5 the mount point (octal
    escapes), the file system type follows the "-" separator."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        try:
            major, minor = (int(x) for x in fields[2].split(":"))
            point = _unescape(fields[4])
            fstype = fields[sep + 1]
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(point, (major, minor), fstype))
    return mounts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def partition_type(root: SysRoot, device: tuple[int, int]) -> tuple[str | None, str | None]:
    """(scheme, type) of a block device from udev's database, lower-case; (None, None)
    if udev does not know it."""
    data = root.read_text(f"/run/udev/data/b{device[0]}:{device[1]}")
    if not data.ok or data.value is None:
        return None, None
    props = dict(line[2:].split("=", 1) for line in data.value.splitlines()
                 if line.startswith("E:") and "=" in line)
    scheme = props.get("ID_PART_ENTRY_SCHEME")
    kind = props.get("ID_PART_ENTRY_TYPE")
    return (scheme.lower() if scheme else None, kind.lower() if kind else None)


@dataclass(frozen=True)
class Partitions:
    esp: Partition | None
    xbootldr: Partition | None
    notes: tuple[str, ...] = ()


def find_partitions(root: SysRoot, *, esp: str | None = None,
                    xbootldr: str | None = None) -> Partitions:
    """The ESP and XBOOTLDR as bootctl finds them; given paths are used as they are."""
    notes: list[str] = []
    if esp is not None:
        _require_directory(root, esp, "ESP")
        found_esp: Partition | None = Partition("esp", esp, "configured")
    else:
        found_esp = _search(root, "esp", ESP_CANDIDATES, notes)
    if xbootldr is not None:
        _require_directory(root, xbootldr, "XBOOTLDR")
        found_x: Partition | None = Partition("xbootldr", xbootldr, "configured")
    else:
        found_x = _search(root, "xbootldr", XBOOTLDR_CANDIDATES, notes)
    if found_esp and found_x and _same_directory(root, found_esp.path, found_x.path):
        notes.append(f"{found_x.path} is the ESP itself: not read twice")
        found_x = None
    if found_esp is None:
        notes.append("no ESP found (none of /efi, /boot, /boot/efi is the root of a FAT "
                     "file system on an ESP partition)")
    return Partitions(found_esp, found_x, tuple(notes))


def _require_directory(root: SysRoot, path: str, what: str) -> None:
    if not path.startswith("/") or not root.is_dir(path):
        raise InvalidArgument(f"{what} path {path!r} is not an absolute path to a directory")


def _same_directory(root: SysRoot, a: str, b: str) -> bool:
    """Both paths are one directory (bootctl drops XBOOTLDR when it is the ESP's device;
    two detected partition roots on one device are one directory, and configured paths
    in one fixture tree share a device without being the same partition)."""
    try:
        sa, sb = os.stat(root.host_path(a)), os.stat(root.host_path(b))
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _search(root: SysRoot, role: str, candidates: tuple[str, ...],
            notes: list[str]) -> Partition | None:
    for path in candidates:
        try:
            # Opening triggers an automount (systemd's gpt-auto /efi, /boot) before
            # mountinfo is read; the descriptor's device must then be that mount's.
            fd = open_directory(root, path)
        except PartitionError:
            continue
        try:
            dev = os.fstat(fd).st_dev
        finally:
            os.close(fd)
        info = root.read_text(MOUNTINFO, limit=4 << 20)
        if not info.ok or info.value is None:
            notes.append(f"cannot read {MOUNTINFO} ({info.error}): no partition detection")
            return None
        mount = next((m for m in reversed(parse_mountinfo(info.value)) if m.point == path),
                     None)
        if mount is None or mount.device != (os.major(dev), os.minor(dev)):
            continue                                 # not the root of a file system
        scheme, kind = partition_type(root, mount.device)
        if role == "esp":
            if mount.fstype not in ("vfat", "msdos"):
                continue
            if kind is None:
                notes.append(f"{path}: partition type unknown to udev; taken as the ESP "
                             "(a FAT file system root, as bootctl does in a container)")
                return Partition(role, path, f"mount point ({mount.fstype}, type unknown)")
            if kind in (ESP_GPT_TYPE, ESP_MBR_TYPE):
                return Partition(role, path, f"mount point ({mount.fstype}, {scheme} ESP)")
            continue
        if kind in (XBOOTLDR_GPT_TYPE, XBOOTLDR_MBR_TYPE):
            return Partition(role, path, f"mount point ({mount.fstype}, {scheme} XBOOTLDR)")
    return None


# --------------------------------------------------------------------------- reading

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_directory(root: SysRoot, path: str) -> int:
    """A descriptor of directory `path` under the root prefix, every component opened
    with O_NOFOLLOW (the prefix itself is trusted as given)."""
    fd = os.open(root.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in _components(path):
            fd = _step(fd, name, _DIR_FLAGS, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def _components(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise PartitionError("unreadable", f"{path}: . and .. are not followed")
    return parts


def _step(dir_fd: int, name: str, flags: int, path: str) -> int:
    """openat one component and close `dir_fd`; on failure `dir_fd` stays open (the
    caller's cleanup closes it)."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _error(path, exc) from None
    os.close(dir_fd)
    return fd


def _error(path: str, exc: OSError) -> PartitionError:
    if exc.errno == errno.ELOOP:
        return PartitionError("not-regular-file", f"{path}: a symbolic link (not followed)")
    if exc.errno == errno.ENOTDIR:
        return PartitionError("unreadable", f"{path}: a path component is not a directory "
                                            "(or is a symbolic link)")
    if exc.errno == errno.ENOENT:
        return PartitionError("missing", f"{path}: does not exist")
    return PartitionError("unreadable", f"{path}: {exc.strerror}")


class PartitionDir:
    """An open partition root; files below it are opened by descriptor only."""

    def __init__(self, root: SysRoot, partition: Partition) -> None:
        self.partition = partition
        self.fd = open_directory(root, partition.path)
        self.dev = os.fstat(self.fd).st_dev

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PartitionDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def platform_path(self, rel: str) -> str:
        return self.partition.path.rstrip("/") + "/" + rel.lstrip("/")

    def _walk(self, rel: str, final_flags: int) -> int:
        parts = _components(rel)
        if not parts:
            raise PartitionError("unreadable", f"{self.platform_path(rel)}: empty path")
        fd = os.dup(self.fd)
        try:
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                fd = _step(fd, name, final_flags if last else _DIR_FLAGS,
                           self.platform_path(rel))
                if os.fstat(fd).st_dev != self.dev:
                    raise PartitionError("not-regular-file", f"{self.platform_path(rel)}: "
                                         "crosses into another file system (not followed)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def listdir(self, rel: str) -> list[tuple[str, bool]]:
        """(name, is a regular file) in directory order (the order a FAT driver, and the
        loader, sees); [] if the directory does not exist."""
        try:
            fd = self._walk(rel, _DIR_FLAGS)
        except PartitionError as exc:
            if exc.reason == "missing":
                return []
            raise
        try:
            result = []
            with os.scandir(fd) as it:
                for item in it:
                    result.append((item.name, item.is_file(follow_symlinks=False)))
                    if len(result) > MAX_DIRECTORY_ENTRIES:
                        raise PartitionError("too-large", f"{self.platform_path(rel)}: more "
                                             f"than {MAX_DIRECTORY_ENTRIES} entries")
            return result
        finally:
            os.close(fd)

    def open_file(self, rel: str) -> int:
        """A read-only descriptor of the regular file `rel` (the caller closes it)."""
        fd = self._walk(rel, _FILE_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PartitionError("not-regular-file",
                                     f"{self.platform_path(rel)}: not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, rel: str, limit: int) -> bytes:
        fd = self.open_file(rel)
        try:
            data = b""
            while len(data) <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise PartitionError("unreadable", f"{self.platform_path(rel)}: {exc.strerror}"
                                 ) from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise PartitionError("too-large", f"{self.platform_path(rel)}: larger than "
                                 f"{limit} bytes")
        return data

    def exists(self, rel: str) -> PartitionError | None:
        """None if `rel` is a readable regular file, else why not."""
        try:
            os.close(self.open_file(rel))
        except PartitionError as exc:
            return exc
        return None

    def writable_by_others(self, rel: str) -> str | None:
        """The first of the partition root, the directories on the way and the file
        itself that a non-root user owns or may write, or None."""
        parts = _components(rel)
        fd = os.dup(self.fd)
        try:
            st = os.fstat(fd)
            where = self.partition.path
            for i in range(len(parts) + 1):
                if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return where
                if i == len(parts):
                    break
                last = i == len(parts) - 1
                fd = _step(fd, parts[i], _FILE_FLAGS if last else _DIR_FLAGS, rel)
                st = os.fstat(fd)
                if st.st_dev != self.dev:
                    raise PartitionError("not-regular-file", f"{self.platform_path(rel)}: "
                                         "crosses into another file system (not followed)")
                where = self.platform_path("/".join(parts[:i + 1]))
            return None
        finally:
            os.close(fd)
