"""Trusted certificates from files (platform layer): PEM (several per file) or DER, parsed
by `formats.authenticode.certificates_from`.

A certificate file decides which images relaunchd (root) will load, so it is read only
when nobody but root (or the caller, for a command a user runs) can have put it there:
walked from "/" by descriptor (`path_walk`), every directory on the way owned by root or
the caller and writable by nobody else (a sticky directory such as /tmp passes: nobody else
can replace what root or the caller owns in it), links followed only when root or the caller
owns them in such a directory, and the file itself owned by root or the caller, writable
by nobody else, a regular file. Errors are `InvalidArgument` naming the file and why.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from relaunchd.errors import InvalidArgument, RelaunchError
from relaunchd.formats import authenticode
from relaunchd.platform import path_walk

CERTIFICATE_FILE_LIMIT = 1 << 20


def _error(message: str) -> RelaunchError:
    return InvalidArgument(f"cannot read certificate {message}")


def read_certificate_file(path: str) -> bytes:
    """The bytes of one certificate file (at most CERTIFICATE_FILE_LIMIT), read under
    the rules above."""
    rules = path_walk.Rules(path_walk.trusted_uids(), "trusted", check_directories=True,
                            sticky_ok=True)
    with path_walk.walk(os.path.abspath(path), rules, _error,
                        path_walk.from_root) as resolved:
        fd, _ = path_walk.open_regular(resolved, rules.trusted, _error)
    chunks: list[bytes] = []
    left = CERTIFICATE_FILE_LIMIT
    try:
        while left and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise _error(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_certificates(paths: Iterable[str]) -> list:
    """Trusted certificates from PEM (several per file allowed) or DER files."""
    trusted: list = []
    for path in paths:
        trusted += authenticode.certificates_from(path, read_certificate_file(path))
    return trusted
