"""A directory of the caller's to write files into, and nothing written through a link
someone else planted (platform layer; `relaunchctl stage --dry-run --output DIR`).

relaunchctl runs as root and DIR is often in a directory everyone may write (the README's
example is /tmp/plan). So DIR is reached by a walk by descriptor (`path_walk`) that follows
a link only when root or the caller owns it and nobody else can change the directory
holding it; an existing DIR must be a directory the caller owns that nobody else may
write, else a fresh one is made (mode 0700). Every file is then created relative to DIR's
descriptor with O_CREAT | O_EXCL | O_NOFOLLOW: a name that already exists — a file, or a
link to one — is a named error, never overwritten. All or nothing: names are checked
before anything is written, and whatever was written is removed again on a failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relaunchd.errors import InvalidArgument, RelaunchError
from relaunchd.platform import path_walk

FILE_MODE = 0o644
DIRECTORY_MODE = 0o700
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Writer = Callable[[int], None]    # writes a file's content to the descriptor it is given


def _error(message: str) -> RelaunchError:
    return InvalidArgument(f"--output {message}")


@dataclass
class OutputDirectory:
    """DIR, open: `fd` (O_PATH) is where every file is created; `parent_fd` is kept to
    remove DIR again when it was `created` here and writing failed."""

    path: str
    fd: int
    parent_fd: int
    name: str
    created: bool
    written: list[str] = field(default_factory=list)

    def close(self) -> None:
        for fd in (self.fd, self.parent_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.parent_fd = -1

    def __enter__(self) -> OutputDirectory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def write_all(self, files: Sequence[tuple[str, Writer]]) -> list[str]:
        """Create each named file and fill it; the paths written. None of the names may
        exist yet; on any failure nothing written here is left behind."""
        for name, _ in files:
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"not a file name: {name!r}")
            try:
                os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            raise _error(f"{os.path.join(self.path, name)}: already exists (not "
                         "overwritten; choose a new or empty directory)")
        try:
            for name, write in files:
                self._create(name, write)
        except BaseException:
            self._undo()
            raise
        return [os.path.join(self.path, name) for name in self.written]

    def _create(self, name: str, write: Writer) -> None:
        target = os.path.join(self.path, name)
        try:
            fd = os.open(name, CREATE_FLAGS, FILE_MODE, dir_fd=self.fd)
        except FileExistsError:
            raise _error(f"{target}: appeared while writing (not overwritten)") from None
        except OSError as exc:
            raise _error(f"{target}: cannot be created: {exc.strerror}") from None
        self.written.append(name)
        try:
            write(fd)
        except OSError as exc:
            raise _error(f"{target}: cannot be written: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _undo(self) -> None:
        # Best effort: the names are ours (created with O_EXCL in our directory).
        for name in reversed(self.written):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
        self.written.clear()
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.name, dir_fd=self.parent_fd)


def open_output_directory(path: str) -> OutputDirectory:
    """DIR for writing: an existing directory the caller owns and nobody else may write,
    or a new one (0700); reached only through links nobody else controls."""
    rules = path_walk.Rules(path_walk.trusted_uids(), "trusted", check_directories=False,
                            sticky_ok=True)
    with path_walk.walk(os.path.abspath(path), rules, _error, path_walk.from_root) as found:
        if found.rest:
            raise _error(f"{found.request}: {found.path} does not exist")
        created = False
        if found.st is None:
            try:
                os.mkdir(found.name, DIRECTORY_MODE, dir_fd=found.dir_fd)
                created = True
            except FileExistsError:
                pass    # made meanwhile by someone else: checked below like any other
            except OSError as exc:
                raise _error(f"{found.request}: cannot be created: {exc.strerror}") from None
        try:
            fd = path_walk.open_step(found.dir_fd, found.name,
                                     os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            why = ("is not a directory (or is a symbolic link)"
                   if exc.errno in (errno.ENOTDIR, errno.ELOOP) else
                   f"cannot be opened: {exc.strerror}")
            raise _error(f"{found.request}: {why}") from None
        try:
            _check_owned(found.request, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        parent = found.dir_fd
        found.dir_fd = -1         # handed over to the OutputDirectory
        return OutputDirectory(found.request, fd, parent, found.name, created)


def _check_owned(path: str, st: os.stat_result) -> None:
    """Owned by the caller, and writable by nobody else: then nobody else can plant a
    name in it."""
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise _error(f"{path}: is {path_walk.kind_of(st.st_mode)}, not a directory")
    if st.st_uid != euid:
        raise _error(f"{path}: is owned by uid {st.st_uid}, not by the caller (uid {euid}); "
                     "choose a directory of your own or one that does not exist yet")
    if st.st_mode & path_walk.WRITABLE_BY_OTHERS:
        raise _error(f"{path}: is writable by group or others (mode "
                     f"{stat.S_IMODE(st.st_mode):04o})")
