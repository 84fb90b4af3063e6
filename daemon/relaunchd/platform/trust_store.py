"""Trusted certificates from files (platform layer): PEM (several per file) or DER, parsed
by `formats.authenticode.certificates_from`."""

from __future__ import annotations

from collections.abc import Iterable

from relaunchd.errors import InvalidArgument
from relaunchd.formats import authenticode

CERTIFICATE_FILE_LIMIT = 1 << 20


def load_certificates(paths: Iterable[str]) -> list:
    """Trusted certificates from PEM (several per file allowed) or DER files."""
    trusted: list = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(CERTIFICATE_FILE_LIMIT)
        except OSError as exc:
            raise InvalidArgument(f"{path}: cannot read certificate: {exc.strerror}") from None
        trusted += authenticode.certificates_from(path, data)
    return trusted
