"""Fixtures of the platform tests: the fixture sysfs tree of tests/support/sysfs_tree.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.sysfs_tree import build_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "root")
