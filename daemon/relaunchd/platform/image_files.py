"""Image files on disk: where they may come from, and opening them safely (platform layer).

Staging reads UKIs (and add-ons) that an update tool or an admin names by path. Such a path
must name a file beneath an allowed directory as configured (or as that directory
resolves); from the allowed directory down it is walked by descriptor (`path_walk`), with
no symbolic link anywhere, each directory and the file owned by root and writable by
nobody else, checked on the descriptor the next step is opened from. The file is then
opened relative to its directory's descriptor, regular files only, and that one descriptor
is what staging copies (`open_allowed`). `check_location` is the same walk without opening
the file, for a synchronous refusal and the image list.

With `follow_symlinks` a link is followed only when root owns it and it sits in one of
those root-owned directories nobody else may write; its target must itself lie beneath an
allowed directory (an absolute target) or not climb above the one the walk is in (a
relative one).

`inspect` and `verify` read any file the caller names (`open_image`): there links are
followed only when root or the caller owns them and nobody else can change the directory
holding them, the last component only with `follow_symlinks`; a FIFO, socket or device is
refused without being opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from relaunchd.errors import InvalidImage
from relaunchd.formats import uki
from relaunchd.platform import path_walk

DEFAULT_IMAGE_DIRS = ("/boot", "/efi", "/boot/efi", "/usr/lib/kernel", "/var/lib/relaunchd/images")
ROOT_ONLY = frozenset({0})


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from. Each allowed directory is trusted as
    configured; below it, nothing on the path may be writable by non-root."""

    allowed_dirs: tuple[str, ...]
    follow_symlinks: bool = False

    @property
    def rules(self) -> path_walk.Rules:
        return path_walk.Rules(ROOT_ONLY, "trusted" if self.follow_symlinks else "never",
                               check_directories=True, sticky_ok=False)

    def start(self, path: str) -> path_walk.Start:
        """The allowed directory `path` names a file beneath (the longest match, as
        configured or as it resolves), and the components below it."""
        parts = path_walk.components(path)
        if not path.startswith("/"):
            raise path_walk.NoStart("is not an absolute path")
        if ".." in parts:
            raise path_walk.NoStart("has a '..' component (refused)")
        best: tuple[str, int] | None = None
        for allowed in self.allowed_dirs:
            for base in {os.path.normpath(allowed), os.path.realpath(allowed)}:
                depth = len(path_walk.components(base))
                if (len(parts) > depth and parts[:depth] == path_walk.components(base)
                        and (best is None or depth > best[1])):
                    best = (base, depth)
        if best is None:
            raise path_walk.NoStart(
                "is not inside an allowed image directory "
                f"({', '.join(self.allowed_dirs) or 'none configured'}); name the image "
                "by its path beneath one, without symbolic links")
        return path_walk.Start(best[0], parts[best[1]:], floor=True)


@dataclass
class ImageFile:
    """An image (or add-on) opened under an `ImagePolicy`: `fd` is the one descriptor
    everything is read from; `path` is the path as requested, `resolved` where the walk
    found it, `directories` every directory from the allowed one down to the file's."""

    path: str
    resolved: str
    fd: int
    st: os.stat_result
    directories: tuple[path_walk.Step, ...]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class ImageDirectory:
    """A directory opened under an `ImagePolicy` (readable, to list it)."""

    path: str
    resolved: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageDirectory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def locate(path: str, policy: ImagePolicy) -> path_walk.Resolved:
    """Walk `path` under `policy` (InvalidImage naming the component that failed);
    the caller closes the result."""
    return path_walk.walk(path, policy.rules, InvalidImage, policy.start)


def check_location(path: str, policy: ImagePolicy) -> str:
    """Where `path` leads, if it may be staged: the walk of `open_allowed` and the
    checks of the file, without opening it."""
    with locate(path, policy) as resolved:
        path_walk.require_regular(resolved, ROOT_ONLY, InvalidImage)
        return resolved.path


def open_allowed(path: str, policy: ImagePolicy) -> ImageFile:
    """The image at `path`, opened once under `policy`."""
    with locate(path, policy) as resolved:
        fd, st = path_walk.open_regular(resolved, ROOT_ONLY, InvalidImage)
        return ImageFile(path, resolved.path, fd, st, resolved.directories)


def open_allowed_directory(path: str, policy: ImagePolicy) -> ImageDirectory | None:
    """The directory at `path` opened under `policy`, or None when it does not exist."""
    with locate(path, policy) as resolved:
        if resolved.st is None:
            return None
        fd, _ = path_walk.open_directory(resolved, ROOT_ONLY, InvalidImage)
        return ImageDirectory(path, resolved.path, fd)


def open_image(
    path: str,
    *,
    follow_symlinks: bool = False,
    machine: int | None = None,
    confirm: bool = True,
) -> uki.UkiImage:
    """Open any UKI file the caller names (`inspect`, `verify`), as `open_regular`
    does. `confirm=False` defers the pefile cross-check to `UkiImage.confirm_headers()`
    (inspect_image runs it while it hashes)."""
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        return uki.from_fd(fd, path, machine=machine, owns_fd=True, confirm=confirm)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str, *, follow_symlinks: bool = False) -> int:
    """A read-only descriptor of the regular file at `path` (the caller closes it).
    Links are followed only when root or the caller owns them and nobody else can change
    the directory holding them; the last component only with `follow_symlinks`. No
    ownership rule otherwise: this only reads and reports, and walks with openat (not
    openat2: the same refusals one name at a time, without loading ctypes)."""
    rules = path_walk.Rules(path_walk.trusted_uids(),
                            "trusted" if follow_symlinks else "trusted-not-last",
                            check_directories=False, sticky_ok=True, openat2=False)
    with path_walk.walk(os.path.abspath(path), rules, InvalidImage,
                        path_walk.from_root) as resolved:
        fd, _ = path_walk.open_regular(resolved, None, InvalidImage)
        return fd
