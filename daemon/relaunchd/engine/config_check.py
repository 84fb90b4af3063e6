"""What `relaunchd --check-config` checks beyond the file itself (engine layer): the files
the configuration names as trust exist and hold certificates.

Without this a missing or garbled certificate file passed the check and every Stage then
failed with VerificationFailed. The file is read as staging reads it
(`platform.trust_store`), so the check and the use cannot disagree.
"""

from __future__ import annotations

from relaunchd.engine.config import Config
from relaunchd.errors import ConfigError, RelaunchError
from relaunchd.platform.trust_store import load_certificates


def check_references(config: Config) -> None:
    """ConfigError naming the key, its line and the file for the first trust file that
    cannot be read or holds no certificate."""
    for i, path in enumerate(config.trust.certificates):
        key = f"trust.certificates[{i}]"
        try:
            if not load_certificates([path]):
                raise ConfigError(f"{path}: no certificate in it")
        except RelaunchError as exc:
            raise ConfigError(f"{key}: {exc}", file=config.source, key=key,
                              line=config.key_lines.get(key)) from None
