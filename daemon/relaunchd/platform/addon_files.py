"""Finding UKI add-ons on disk as systemd-stub does, and copying them into sealed memory
(platform layer; the rules for which apply and what they add are in `formats.addons`).

Where the stub looks (uki.md §1.5, systemd stub.c load_all_addons): on the partition the UKI
was loaded from, first in `\\loader\\addons\\`, then in `<UKI path>.extra.d\\`; each
directory sorted by name; dot-files, directories, non-ASCII names, names over 255 characters and
names not ending in `.addon.efi` (any case) are passed over. Each add-on must pass the image's
location rules and is read through its own sealed memfd copy.
"""

from __future__ import annotations

import os

from relaunchd.errors import InvalidImage
from relaunchd.formats.addons import Addon
from relaunchd.platform import image_files, sealed_memfd

GLOBAL_DIR = "loader/addons"
PER_UKI_SUFFIX = ".extra.d"
SUFFIX = ".addon.efi"
NAME_MAX = 255
MAX_ADDONS = 128                   # per directory; far beyond any real setup


def directories(image_path: str, boot_partition: str | None) -> list[tuple[str, str]]:
    """(scope, directory) in the stub's order. `boot_partition` is the root of the
    partition the UKI is booted from; None: the mount point holding the image."""
    real = os.path.realpath(image_path)
    root = boot_partition if boot_partition is not None else mount_point(real)
    return [("global", os.path.join(root, GLOBAL_DIR)), ("per-UKI", real + PER_UKI_SUFFIX)]


def mount_point(path: str) -> str:
    """The top of the file system holding `path` (where st_dev changes going up)."""
    current = os.path.dirname(path)
    try:
        dev = os.stat(current).st_dev
        while current != "/":
            parent = os.path.dirname(current)
            if os.stat(parent).st_dev != dev:
                break
            current = parent
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot find its file system's root: {exc.strerror}"
                           ) from None
    return current


def candidates(directory: str) -> list[str]:
    """The entries of one add-on directory the stub would try, sorted as it sorts."""
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise InvalidImage(f"{directory}: cannot list add-ons: {exc.strerror}") from None
    names = sorted(
        n for n in entries
        if not n.startswith(".") and n.isascii() and len(n) <= NAME_MAX
        and n.lower().endswith(SUFFIX) and not os.path.isdir(os.path.join(directory, n)))
    if len(names) > MAX_ADDONS:
        raise InvalidImage(f"{directory}: {len(names)} add-ons; at most {MAX_ADDONS} are "
                           "taken")
    # strcmp16 on ASCII names orders as Python's code-point sort does.
    return [os.path.join(directory, n) for n in names]


def discover(image_path: str, policy: image_files.ImagePolicy,
             boot_partition: str | None = None) -> list[Addon]:
    """Every add-on file the stub would try for this UKI, each copied into a sealed
    memfd and its headers parsed. A file that cannot be read safely (location,
    symlink, not a PE for this machine) is an error naming it."""
    found: list[Addon] = []
    try:
        for scope, directory in directories(image_path, boot_partition):
            for path in candidates(directory):
                found.append(_load(path, scope, policy))
    except BaseException:
        for addon in found:
            addon.close()
        raise
    return found


def _load(path: str, scope: str, policy: image_files.ImagePolicy) -> Addon:
    image_files.check_location(path, policy)
    src = image_files.open_regular(path, follow_symlinks=policy.follow_symlinks)
    try:
        fd = sealed_memfd.sealed_copy(src, f"addon:{os.path.basename(path)}")
    finally:
        os.close(src)
    try:
        return Addon.from_fd(fd, path, scope)
    except BaseException:
        os.close(fd)
        raise
