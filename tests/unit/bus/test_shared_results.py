"""bus.shared_results: one Check probe for many callers, its result reused briefly,
failures not kept.
The whole service is flooded in tests/integration/test_security_bus.py and measured by
benchmarks/bus_starvation.py (issue #14, item 3)."""

from __future__ import annotations

import pytest

from relaunchd.bus.shared_results import SharedResults
from relaunchd.errors import Busy
from support.fake_clock import Clock

# ------------------------------------------------------------------ shared Check results

def test_one_computation_for_many_and_its_result_reused_for_a_while():
    clock = Clock()
    shared: SharedResults[str, str] = SharedResults(ttl=2.0, max_waiters=3, clock=clock)
    assert shared.fresh("kexec") is None
    assert shared.join("kexec", "w1") is False     # w1 starts the probe
    assert shared.join("kexec", "w2") is True      # w2 waits for it
    assert shared.join(None, "w3") is False        # another key: its own probe
    assert shared.finish("kexec", "report") == ["w1", "w2"]
    assert shared.fresh("kexec") == "report"
    clock.now += 2.5
    assert shared.fresh("kexec") is None           # too old: probe again


def test_failures_are_not_kept_and_waiters_are_bounded():
    shared: SharedResults[str, str] = SharedResults(ttl=2.0, max_waiters=2)
    shared.join("auto", "w1")
    shared.join("auto", "w2")
    with pytest.raises(Busy, match="2 identical calls"):
        shared.join("auto", "w3")
    assert shared.finish("auto", None) == ["w1", "w2"]
    assert shared.fresh("auto") is None
