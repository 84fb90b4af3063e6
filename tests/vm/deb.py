"""The project's own Debian package, as the guest receives it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEB_TIMEOUT = 900


def build_deb() -> Path:
    """packaging/build-deb (cached by a hash of the sources); the .deb's path."""
    proc = subprocess.run([str(REPO / "packaging" / "build-deb")], capture_output=True,
                          text=True, timeout=DEB_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"packaging/build-deb failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])
