"""What the path-resolution tests share (tests/unit/platform/test_image_files.py,
test_path_walk.py, test_trust_store.py, test_output_dir.py): open descriptors, the image
policy over `image_tree` and the refusal check. Their fixtures (`mode`: the three ways a walk
can run; `image_tree`) are in tests/unit/platform/conftest.py."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.platform import image_files

NOBODY = 65534
CONTENT = b"MZ not really a UKI, but a regular file with known bytes\n"


def open_fds() -> dict[str, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):     # the listing's own descriptor
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def policy(tree: Path, follow: bool = False) -> image_files.ImagePolicy:
    return image_files.ImagePolicy((str(tree / "allowed"),), follow_symlinks=follow)


def refused(path: Path | str, pol: image_files.ImagePolicy, fragment: str) -> str:
    """Both the opener and the cheap check refuse, with the same message, naming the
    request, leaving no descriptor open."""
    before = open_fds()
    with pytest.raises(InvalidImage) as opened:
        image_files.open_allowed(str(path), pol).close()
    with pytest.raises(InvalidImage) as checked:
        image_files.check_location(str(path), pol)
    assert open_fds() == before
    message = str(opened.value)
    assert fragment in message, message
    assert message.startswith(f"{path}: "), message
    assert str(checked.value) == message
    return message


