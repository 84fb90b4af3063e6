"""The configuration values (relaunchd.engine.config): frozen records, their JSON form and
the probe configuration they name. Reading the file is tests/unit/engine/test_config_file.py."""

from __future__ import annotations

import dataclasses

import pytest

from relaunchd.engine.config import Config


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.root = "/x"   # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.launch.method = "txt"   # type: ignore[misc]
