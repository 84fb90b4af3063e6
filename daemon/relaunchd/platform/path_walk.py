"""Resolving a path one directory at a time, by descriptor (platform layer).

relaunchd runs as root and reads files other programs name by path (the UKI to stage, its
add-ons, certificate files) and writes `--dry-run --output DIR`. Checking a path by string
and opening it again afterwards leaves a window in which a user who controls a directory or
a symbolic link on the way swaps what is opened (issue 14). So a path is walked one
component at a time: each directory is opened relative to the descriptor of the one before
and checked on its own descriptor (`fstat`: who owns it, who may write it) before anything
is looked up in it, and the caller opens the last entry relative to the descriptor of the
directory holding it. What was checked is what gets opened.

Each step opens one name with `openat2(dir_fd, name, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
| RESOLVE_NO_MAGICLINKS)` (include/uapi/linux/openat2.h, Linux 5.6; Python has no
wrapper, so it goes through syscall(2) with `struct open_how`); on a kernel without it
(ENOSYS), or where a seccomp filter refuses it (EPERM, as container runtimes' default
profiles did before they knew it), `openat(dir_fd, name, O_NOFOLLOW)`, which refuses the
same for a single name (it has no "/" to climb out with, and O_NOFOLLOW refuses a link).
One openat2 of the whole path would not do: it returns no descriptor of the directories
in between, which is where the ownership and mode checks have to run.

A symbolic link is refused unless the `Rules` allow following links, and then only a link
no untrusted user can have put there is followed: owned by a trusted uid, in a directory
owned by a trusted uid that nobody else may write (or that is sticky, like /tmp, where
nobody else can remove or replace a trusted uid's entry; unlink(2), "sticky bit").
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from relaunchd.errors import RelaunchError

# include/uapi/linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STEP_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# asm-generic/unistd.h and arch/x86/entry/syscalls/syscall_64.tbl: 437 on every
# architecture relaunchd runs on (x86_64, aarch64, riscv64).
SYS_OPENAT2 = 437
MAX_LINKS = 40          # include/linux/namei.h MAXSYMLINKS, as the kernel's own walk
DIRECTORY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH

Error = Callable[[str], RelaunchError]     # a message -> the named error to raise
FollowLinks = Literal["never", "trusted", "trusted-not-last"]


class NoStart(Exception):
    """An anchor has no start for this path; the argument says why."""


@functools.cache
def _openat2_syscall() -> Callable[[int, str, int, int, int], int]:
    """openat2 through syscall(2) with `struct open_how`, built on first use and kept (a
    cache of a constant, not state): importing ctypes costs ~3 ms, measured +5 ms on
    `relaunchctl inspect`, which walks without openat2 (`Rules.openat2`); building the
    CDLL costs ~25 µs, five times the system call, on every step if it were not kept."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64))

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long

    def call(dir_fd: int, name: str, flags: int, resolve: int, mode: int) -> int:
        how = OpenHow(flags, mode, resolve)
        fd = syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                     ctypes.c_char_p(os.fsencode(name)), ctypes.byref(how),
                     ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), name)
        return int(fd)

    return call


def openat2(dir_fd: int, name: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); OSError with the kernel's errno on failure."""
    return _openat2_syscall()(dir_fd, name, flags, resolve, mode)


def open_step(dir_fd: int, name: str, flags: int, use_openat2: bool = True) -> int:
    """Open one name (no "/") in `dir_fd` without following a link, by openat2 where
    the kernel has it (and `use_openat2`), else by openat with O_NOFOLLOW. (A genuine
    EPERM, e.g. O_NOATIME on another's file, comes back from openat as well.)"""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a single path component: {name!r}")
    if use_openat2:
        try:
            return openat2(dir_fd, name, flags | os.O_NOFOLLOW, STEP_RESOLVE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
    return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)


def components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def kind_of(mode: int) -> str:
    """What a file type is called in messages."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "of an unknown type"


def owners(trusted: frozenset[int]) -> str:
    """The trusted uids, for messages: "root", "root or uid 1000"."""
    return " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(trusted))


def others(trusted: frozenset[int]) -> str:
    """Everyone else, for messages."""
    if trusted == frozenset({0}):
        return "non-root users"
    return f"users other than {owners(trusted)}"


def trusted_uids() -> frozenset[int]:
    """Root, and the caller: a user's own links and directories are their own choice."""
    return frozenset({0, os.geteuid()})


@dataclass(frozen=True)
class Rules:
    """What a walk accepts.

    `trusted`: the uids that may own what is walked (and the links followed).
    `follow_links`: "never"; "trusted" (links as the module docstring says); or
    "trusted-not-last" (the same, but the last component itself must not be a link).
    `check_directories`: every directory walked must be owned by a trusted uid and not
    writable by anyone else — unless `sticky_ok` and it is sticky (then every entry taken
    from it is owned by a trusted uid: the next directory is checked, a link must be).
    `openat2`: each step by openat2 (the kernel enforcing the rules of one step as well);
    False: by openat with O_NOFOLLOW, which refuses the same for one name, for the
    report-only openers that should not load ctypes (see `_openat2_call`).
    """

    trusted: frozenset[int]
    follow_links: FollowLinks = "never"
    check_directories: bool = True
    sticky_ok: bool = False
    openat2: bool = True


@dataclass(frozen=True)
class Step:
    """A directory the walk went through: its path (as walked) and its stat."""

    path: str
    st: os.stat_result


@dataclass
class Resolved:
    """The end of a walk: the directory holding the last entry, open (`dir_fd`, an O_PATH
    descriptor the caller closes), the entry's name in it and its lstat (None when it
    does not exist), and every directory from the start down. When a component does not
    exist the walk stops there: `st` is None and `rest` holds the components after it
    (empty when it was the last)."""

    request: str
    path: str
    dir_fd: int
    name: str
    st: os.stat_result | None
    directories: tuple[Step, ...]
    rest: tuple[str, ...] = ()
    openat2: bool = True          # how the last entry is opened (`Rules.openat2`)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class Start:
    """Where a walk begins: a directory path and the components below it. `floor`:
    whether ".." at the start is refused (a walk beneath a directory) or stays there
    (a walk from "/")."""

    path: str
    below: list[str]
    floor: bool = True


Anchor = Callable[[str], Start]   # absolute path -> where its walk begins


@dataclass
class Walk:
    """One walk of `request` under `rules`, raising `error` with a message that names the
    component that failed and why. `_stack`: the directories from the start down, each
    with its open descriptor."""

    request: str
    rules: Rules
    error: Error
    anchor: Anchor
    _stack: list[tuple[Step, int]] = field(default_factory=list, init=False)
    _floor: bool = field(default=True, init=False)

    def fail(self, here: str, why: str) -> RelaunchError:
        if here == self.request:
            return self.error(f"{self.request}: {why}")
        return self.error(f"{self.request}: {here} {why}")

    def run(self) -> Resolved:
        links = 0
        try:
            pending = self._begin(self.request)
            while True:
                if not pending:
                    raise self.fail(self.request, "ends in a directory, not a file name")
                name = pending.pop(0)
                if name == "..":
                    self._up()
                    continue
                top, top_fd = self._stack[-1]
                here = os.path.join(top.path, name)
                try:
                    st: os.stat_result | None = os.stat(name, dir_fd=top_fd,
                                                        follow_symlinks=False)
                except FileNotFoundError:
                    return self._finish(here, name, None, tuple(pending))
                except OSError as exc:
                    raise self.fail(here, f"cannot be checked: {exc.strerror}") from None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    links += 1
                    pending = self._link(here, name, st, links, last=not pending) + pending
                elif not pending:
                    return self._finish(here, name, st)
                else:
                    self._descend(here, name, st)
        finally:
            self._close()

    # ------------------------------------------------------------------ steps

    def _begin(self, path: str) -> list[str]:
        """Open where the walk of `path` starts (again, after an absolute link)."""
        try:
            start = self.anchor(path)
        except NoStart as exc:
            raise self.fail(path, str(exc)) from None
        self._close()
        try:
            # The start is trusted as named (a configured directory, or "/"); it is
            # checked below like every directory after it.
            fd = os.open(start.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self.fail(start.path, f"cannot be opened: {exc.strerror}") from None
        step = Step(start.path, os.fstat(fd))
        self._stack.append((step, fd))
        self._floor = start.floor
        self._check_directory(step)
        return components("/".join(start.below))

    def _up(self) -> None:
        if len(self._stack) == 1:
            if self._floor:
                raise self.fail(self._stack[0][0].path, "would be left by '..' (refused)")
            return      # "/.." is "/"
        os.close(self._stack.pop()[1])

    def _descend(self, here: str, name: str, st: os.stat_result | None) -> None:
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise self.fail(here, "does not exist" if st is None
                            else f"is {kind_of(st.st_mode)}, not a directory")
        try:
            fd = open_step(self._stack[-1][1], name, DIRECTORY_FLAGS, self.rules.openat2)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self.fail(here, "was replaced while it was walked") from None
            raise self.fail(here, f"cannot be opened: {exc.strerror}") from None
        step = Step(here, os.fstat(fd))
        self._stack.append((step, fd))
        self._check_directory(step)

    def _link(self, here: str, name: str, st: os.stat_result, count: int,
              last: bool) -> list[str]:
        """Where a link leads, as the components to walk next (from a new start when
        it is absolute); refused unless the rules allow this very link."""
        parent, parent_fd = self._stack[-1]
        mode = self.rules.follow_links
        if mode == "never" or (mode == "trusted-not-last" and last):
            raise self.fail(here, "is a symbolic link (refused)")
        if st.st_uid not in self.rules.trusted:
            raise self.fail(here, f"is a symbolic link owned by uid {st.st_uid} (only "
                            f"links of {owners(self.rules.trusted)} are followed)")
        if parent.st.st_uid not in self.rules.trusted or not self._stable(parent.st):
            raise self.fail(here, f"is a symbolic link in a directory "
                            f"{others(self.rules.trusted)} can change (not followed)")
        if count > MAX_LINKS:
            raise self.fail(self.request, f"has more than {MAX_LINKS} symbolic links")
        try:
            target = os.readlink(name, dir_fd=parent_fd)
        except OSError as exc:
            raise self.fail(here, f"cannot be read: {exc.strerror}") from None
        if not target:
            raise self.fail(here, "is an empty symbolic link")
        if target.startswith("/"):
            return self._begin(target)
        return [part for part in target.split("/") if part not in ("", ".")]

    def _finish(self, here: str, name: str, st: os.stat_result | None,
                rest: tuple[str, ...] = ()) -> Resolved:
        step, fd = self._stack.pop()
        directories = (*(s for s, _ in self._stack), step)
        return Resolved(self.request, here, fd, name, st, directories, rest,
                        self.rules.openat2)

    # ------------------------------------------------------------------ checks

    def _stable(self, st: os.stat_result) -> bool:
        """Nobody but its owner (and root) can add, remove or replace its entries."""
        return not st.st_mode & WRITABLE_BY_OTHERS or (
            self.rules.sticky_ok and bool(st.st_mode & stat.S_ISVTX))

    def _check_directory(self, step: Step) -> None:
        if self.rules.check_directories:
            check_owner_and_mode(step.st, step.path, self.rules.trusted, self.fail,
                                 sticky_ok=self.rules.sticky_ok)

    def _close(self) -> None:
        for _, fd in self._stack:
            os.close(fd)
        self._stack.clear()


def check_owner_and_mode(st: os.stat_result, here: str, trusted: frozenset[int],
                         fail: Callable[[str, str], RelaunchError], *,
                         sticky_ok: bool = False) -> None:
    """Owned by a trusted uid, and writable by nobody else (a sticky directory passes
    when `sticky_ok`: nobody else can remove or replace the entries it holds)."""
    if st.st_uid not in trusted:
        raise fail(here, f"is owned by uid {st.st_uid}, not {owners(trusted)}")
    if st.st_mode & WRITABLE_BY_OTHERS and not (
            sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        raise fail(here, f"is writable by {others(trusted)}")


def walk(request: str, rules: Rules, error: Error, anchor: Anchor) -> Resolved:
    """Walk `request` (absolute) from where `anchor` says, under `rules`."""
    return Walk(request, rules, error, anchor).run()


def from_root(path: str) -> Start:
    """The anchor of a walk from "/"."""
    return Start("/", components(path), floor=False)


def in_root(root: str) -> Anchor:
    """The anchor of a walk below `root` as if it were "/" (openat2's RESOLVE_IN_ROOT, done
    step by step): an absolute link starts again from `root`, and ".." at `root` stays
    there, so no link or ".." leads out of it. For paths other programs name under a
    `--root` prefix, such as a crypttab device's /dev/disk/by-uuid/… link."""
    def anchor(path: str) -> Start:
        return Start(root, components(path), floor=False)
    return anchor


def below(root: str, path: str) -> str:
    """A path a walk `in_root(root)` reached, as seen from `root`."""
    if root.rstrip("/") and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")):]
    return path


def _failer(resolved: Resolved, error: Error) -> Callable[[str, str], RelaunchError]:
    def fail(here: str, why: str) -> RelaunchError:
        if here == resolved.request:
            return error(f"{resolved.request}: {why}")
        return error(f"{resolved.request}: {here} {why}")
    return fail


def _missing(resolved: Resolved, error: Error) -> RelaunchError:
    return _failer(resolved, error)(resolved.path, "does not exist (no such file or "
                                    "directory)")


def require_regular(resolved: Resolved, trusted: frozenset[int] | None,
                    error: Error) -> os.stat_result:
    """The lstat of the regular file a walk ended at, without opening it (the cheap
    check); with `trusted`, owned by one of them and writable by nobody else."""
    fail, st = _failer(resolved, error), resolved.st
    if st is None:
        raise _missing(resolved, error)
    if not stat.S_ISREG(st.st_mode):
        raise fail(resolved.path, f"is {kind_of(st.st_mode)}, not a regular file")
    if trusted is not None:
        check_owner_and_mode(st, resolved.path, trusted, fail)
    return st


def open_regular(resolved: Resolved, trusted: frozenset[int] | None, error: Error,
                 ) -> tuple[int, os.stat_result]:
    """Open the regular file a walk ended at, read-only, relative to its directory's
    descriptor. Refused before opening when it is not a regular file (a FIFO is never
    waited for, a device never opened: O_NONBLOCK and O_NOCTTY besides), and checked
    again on the descriptor, which must be the very file the walk saw."""
    require_regular(resolved, trusted, error)
    return open_entry(resolved, READ_FLAGS, error, trusted)


def open_entry(resolved: Resolved, flags: int, error: Error,
               trusted: frozenset[int] | None = None,
               replaced: tuple[int, ...] = (errno.ELOOP, errno.ENOENT),
               ) -> tuple[int, os.stat_result]:
    """Open whatever the walk ended at (a device node too) with `flags`, relative to its
    directory's descriptor and never through a link, checked on the descriptor to be the
    very entry the walk saw; with `trusted`, owned by one of them and writable by nobody
    else. The caller checks its type."""
    fail, seen = _failer(resolved, error), resolved.st
    if seen is None:
        raise _missing(resolved, error)
    try:
        fd = open_step(resolved.dir_fd, resolved.name, flags, resolved.openat2)
    except OSError as exc:
        if exc.errno in replaced:
            raise fail(resolved.path, "was replaced while it was opened") from None
        raise fail(resolved.path, f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            raise fail(resolved.path, "was replaced while it was opened")
        if trusted is not None:
            check_owner_and_mode(st, resolved.path, trusted, fail)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def open_directory(resolved: Resolved, trusted: frozenset[int] | None, error: Error,
                   flags: int = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                   ) -> tuple[int, os.stat_result]:
    """Open the directory a walk ended at (readable, to list it), relative to its
    parent's descriptor; with `trusted`, owned by one of them and writable by nobody
    else, checked on the descriptor."""
    fail, seen = _failer(resolved, error), resolved.st
    if seen is None:
        raise _missing(resolved, error)
    if not stat.S_ISDIR(seen.st_mode):
        raise fail(resolved.path, f"is {kind_of(seen.st_mode)}, not a directory")
    return open_entry(resolved, flags, error, trusted,
                      replaced=(errno.ELOOP, errno.ENOENT, errno.ENOTDIR))
