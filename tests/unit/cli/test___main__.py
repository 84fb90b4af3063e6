"""`python -m relaunchd.cli` (relaunchd.cli.__main__) is relaunchctl: the way an unprivileged
client runs it from a copy of the package (tests/support/dbus_harness.relaunchctl)."""

from __future__ import annotations

import subprocess
import sys


def test_it_is_relaunchctl():
    module = subprocess.run([sys.executable, "-m", "relaunchd.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and module.stdout.startswith("usage: relaunchctl")
    bad = subprocess.run([sys.executable, "-m", "relaunchd.cli", "check", "--json",
                              "--root", "/nonexistent"], capture_output=True, text=True,
                             timeout=60)
    assert bad.returncode == 2 and "InvalidArgument" in bad.stderr    # its exit codes
