"""Shared fixtures. Tiers are assigned by directory: tests/unit → `unit`,
tests/integration → `integration`, tests/vm → `vm` (pytest -m selects them)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import ukibuild

TIERS = ("unit", "integration", "vm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """relaunchd.daemon.main sets the root logger's handler to the stderr of the moment,
    which pytest closes after the test; a later test's engine thread logging through it
    would hit a closed file. Each test gets the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def debian_kernel() -> ukibuild.DebianKernel:
    """Debian 12's cloud kernel (signed bzImage), downloaded once and cached."""
    return ukibuild.debian_kernel()


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, ukibuild.SigningKey]:
    """Two unrelated self-signed code-signing keys: `db` (trusted) and `other`."""
    d = tmp_path_factory.mktemp("keys")
    return {
        "db": ukibuild.make_signing_key(d, "db", "relaunchd test db"),
        "other": ukibuild.make_signing_key(d, "other", "relaunchd other signer"),
    }


@pytest.fixture(scope="session")
def real_ukis(tmp_path_factory, debian_kernel, keys) -> dict[str, Path]:
    """The real UKIs of the test suite, built once per session (see ukibuild)."""
    return ukibuild.build_test_set(tmp_path_factory.mktemp("ukis"), debian_kernel, keys)
