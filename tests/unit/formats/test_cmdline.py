"""The kernel command line as systemd-stub composes it (relaunchd.formats.cmdline)."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.formats import cmdline


def test_cmdline_rules():
    assert cmdline.compose("  quiet\n").text == "quiet"
    assert cmdline.compose("quiet", custom="debug").text == "debug"
    sb = cmdline.compose("quiet", custom="debug", secure_boot=True)
    assert sb.text == "quiet" and sb.custom_dropped
    # no .cmdline in the UKI: a custom one is honoured even under Secure Boot
    assert cmdline.compose(None, custom="debug", secure_boot=True).text == "debug"
    both = cmdline.compose("a", addons=[" b\n", "c\t"], extra=["relaunchd.id=1"])
    assert both.text == "a b c relaunchd.id=1"
    assert both.nul_terminated == b"a b c relaunchd.id=1\0"
    assert cmdline.compose(None).text == ""
    with pytest.raises(InvalidArgument, match="at most 10"):
        cmdline.compose("x" * 11, limit=10)
