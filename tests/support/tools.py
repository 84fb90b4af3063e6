"""Tools the tests use as oracles or fixtures. `make setup` installs every one of them
(.ci/host-packages.txt), so a missing tool fails the test that needs it instead of
skipping it: a skipped oracle is a check that cannot fail."""

from __future__ import annotations

import shutil

import pytest


def require(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup`", pytrace=False)
