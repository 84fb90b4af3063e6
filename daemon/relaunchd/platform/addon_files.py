"""Finding UKI add-ons on disk as systemd-stub does, and copying them into sealed memory
(platform layer; the rules for which apply and what they add are in `formats.addons`).

Where the stub looks (uki.md §1.5, systemd stub.c load_all_addons): on the partition the UKI
was loaded from, first in `\\loader\\addons\\`, then in `<UKI path>.extra.d\\`; each
directory sorted by name; dot-files, directories, non-ASCII names, names over 255 characters and
names not ending in `.addon.efi` (any case) are passed over.

Both directories are opened under the image's `ImagePolicy` (`image_files`: beneath an
allowed directory, walked by descriptor, root-owned, writable by nobody else) and listed
through that descriptor; each add-on is opened relative to it under the same rules and read
through its own sealed memfd copy. The per-UKI directory sits beside the file the image's
walk ended at; the partition is the one holding that file.
"""

from __future__ import annotations

import os
import stat

from relaunchd.errors import InvalidImage
from relaunchd.formats.addons import Addon
from relaunchd.platform import image_files, path_walk, sealed_memfd

GLOBAL_DIR = "loader/addons"
PER_UKI_SUFFIX = ".extra.d"
SUFFIX = ".addon.efi"
NAME_MAX = 255
MAX_ADDONS = 128                   # per directory; far beyond any real setup


def directories(image: image_files.ImageFile,
                boot_partition: str | None) -> list[tuple[str, str]]:
    """(scope, directory) in the stub's order. `boot_partition` is the root of the
    partition the UKI is booted from; None: the mount point holding the image."""
    root = boot_partition if boot_partition is not None else partition_root(image)
    return [("global", os.path.join(root, GLOBAL_DIR)),
            ("per-UKI", image.resolved + PER_UKI_SUFFIX)]


def partition_root(image: image_files.ImageFile) -> str:
    """The top of the file system holding the image: among the directories its walk
    went through, the highest on the image's device; above the allowed directory
    (trusted as configured), where st_dev changes going up from it."""
    top = None
    for step in reversed(image.directories):
        if step.st.st_dev != image.st.st_dev:
            break
        top = step.path
    if top is None:
        return image.directories[-1].path   # the file is a mount point of its own
    if top != image.directories[0].path:
        return top
    return mount_point(os.path.realpath(top))


def mount_point(directory: str) -> str:
    """The top of the file system holding `directory` (where st_dev changes going up)."""
    current = directory
    try:
        dev = os.stat(current).st_dev
        while current != "/":
            parent = os.path.dirname(current)
            if os.stat(parent).st_dev != dev:
                break
            current = parent
    except OSError as exc:
        raise InvalidImage(f"{directory}: cannot find its file system's root: "
                           f"{exc.strerror}") from None
    return current


def candidates(directory: image_files.ImageDirectory) -> list[str]:
    """The names in one add-on directory the stub would try, sorted as it sorts."""
    try:
        entries = os.listdir(directory.fd)
    except OSError as exc:
        raise InvalidImage(f"{directory.path}: cannot list add-ons: {exc.strerror}") from None
    names = sorted(
        n for n in entries
        if not n.startswith(".") and n.isascii() and len(n) <= NAME_MAX
        and n.lower().endswith(SUFFIX) and not _is_directory(directory, n))
    if len(names) > MAX_ADDONS:
        raise InvalidImage(f"{directory.path}: {len(names)} add-ons; at most {MAX_ADDONS} "
                           "are taken")
    # strcmp16 on ASCII names orders as Python's code-point sort does.
    return names


def _is_directory(directory: image_files.ImageDirectory, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return True      # gone since the listing: nothing to take
    except OSError as exc:
        raise InvalidImage(f"{os.path.join(directory.path, name)}: cannot be checked: "
                           f"{exc.strerror}") from None


def discover(image: image_files.ImageFile, policy: image_files.ImagePolicy,
             boot_partition: str | None = None) -> list[Addon]:
    """Every add-on file the stub would try for this UKI, each copied into a sealed
    memfd and its headers parsed. A file that cannot be read safely (location,
    symlink, not a PE for this machine) is an error naming it."""
    found: list[Addon] = []
    try:
        for scope, path in directories(image, boot_partition):
            directory = _open_directory(path, policy)
            if directory is None:
                continue
            with directory:
                for name in candidates(directory):
                    found.append(_load(directory, name, scope, policy))
    except BaseException:
        for addon in found:
            addon.close()
        raise
    return found


def _open_directory(path: str, policy: image_files.ImagePolicy,
                    ) -> image_files.ImageDirectory | None:
    """An add-on directory under the image policy; None when it does not exist or holds
    nothing the stub would take. One that holds add-ons but is refused by the policy is
    an error: the stub would read them."""
    try:
        return image_files.open_allowed_directory(path, policy)
    except InvalidImage:
        try:
            # Only names, to decide whether the refusal matters; nothing is opened.
            names = os.listdir(path)
        except OSError:
            return None
        if any(n.lower().endswith(SUFFIX) and not n.startswith(".") for n in names):
            raise
        return None


def _load(directory: image_files.ImageDirectory, name: str, scope: str,
          policy: image_files.ImagePolicy) -> Addon:
    path = os.path.join(directory.resolved, name)
    with _open_addon(directory, name, path, policy) as src:
        fd = sealed_memfd.sealed_copy(src.fd, f"addon:{name}", src.st.st_size)
    try:
        return Addon.from_fd(fd, path, scope)
    except BaseException:
        os.close(fd)
        raise


def _open_addon(directory: image_files.ImageDirectory, name: str, path: str,
                policy: image_files.ImagePolicy) -> image_files.ImageFile:
    """The add-on `name`, opened relative to its listed directory's descriptor; a
    link there is walked again from its allowed directory when the policy follows
    links (and refused by name when it does not)."""
    try:
        st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot be checked: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) and policy.follow_symlinks:
        return image_files.open_allowed(path, policy)
    # Borrows the directory's descriptor (not closed here: `discover` closes it).
    entry = path_walk.Resolved(path, path, directory.fd, name, st, ())
    fd, opened = path_walk.open_regular(entry, image_files.ROOT_ONLY, InvalidImage)
    return image_files.ImageFile(path, path, fd, opened, ())
