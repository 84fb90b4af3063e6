"""The image catalogue (relaunchd.engine.catalogue): ListImages and Inspect over the
FakeMachine, whose catalogue steps are the real ones."""

from __future__ import annotations

import json

import pytest

from relaunchd.errors import (
    InvalidImage,
)


def test_list_images_reports_invalid(env):
    engine = env.engine()
    (env.tmp / "images" / "notes.txt").write_text("ignored")
    images = engine.list_images()
    assert len(images) == 1
    entry = images[0]
    assert entry["path"] == env.image and entry["size"] > 0 and "mtime" in entry
    assert "error" in entry
    json.dumps(images)


def test_inspect_invalid(env):
    with pytest.raises(InvalidImage):
        env.engine().inspect(env.image)
