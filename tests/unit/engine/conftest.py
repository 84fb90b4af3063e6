"""Fixtures of the engine tests: `env`, the engine over the in-memory FakeMachine
(tests/support/engine_env.py)."""

from __future__ import annotations

import pytest

from support.engine_env import Env, make_env


@pytest.fixture
def env(tmp_path, keys) -> Env:
    return make_env(tmp_path, str(keys["db"].cert))
