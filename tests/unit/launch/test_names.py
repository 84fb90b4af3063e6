"""The launch methods' names without their machinery (relaunchd.launch.names): what the
configuration and the CLI validate against."""

from __future__ import annotations

import subprocess
import sys

from relaunchd.engine.config import LAUNCH_METHODS
from relaunchd.launch import names


def test_names_and_which_are_dynamic_launches():
    assert names.NAMES == ("txt", "skinit", "kexec")
    assert [n for n in names.NAMES if names.is_drtm(n)] == list(names.DRTM_NAMES)
    assert not names.is_drtm("auto") and not names.is_drtm("kexec")


def test_the_configuration_offers_exactly_these_plus_auto():
    assert ("auto", *names.NAMES) == LAUNCH_METHODS


def test_it_imports_nothing():
    code = ("import sys; import relaunchd.launch.names; "
            "print(sorted(m for m in sys.modules if m.startswith('relaunchd.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "['relaunchd.launch', 'relaunchd.launch.names']"
