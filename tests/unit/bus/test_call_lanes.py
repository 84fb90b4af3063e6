"""bus.call_lanes: the control and query worker lanes, their bounds, and the calls they
refuse (waited too long) or drop (the caller left).
The whole service is flooded in tests/integration/test_security_bus.py and measured by
benchmarks/bus_starvation.py (issue #14, item 3)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from relaunchd.bus.call_lanes import Lane, LaneLimits
from relaunchd.errors import Busy

CONTROL = {"Stage", "Relaunch", "Rehearse", "Cancel"}


# ------------------------------------------------------------------ lanes

def lane(limits: LaneLimits, present=lambda caller: True) -> Lane:
    return Lane("test", limits, present)


def wait_for(future_box: list[Future], timeout: float = 5) -> Future:
    deadline = time.monotonic() + timeout
    while not future_box and time.monotonic() < deadline:
        time.sleep(0.005)
    return future_box[0]


def test_lane_bounds_what_it_admits():
    release = threading.Event()
    q = lane(LaneLimits(workers=1, admitted=3, per_caller=2, max_wait=60))
    try:
        now = time.monotonic()
        q.submit(":1.1", now, release.wait, lambda f: None)
        q.submit(":1.1", now, lambda: None, lambda f: None)
        with pytest.raises(Busy, match="2 of your calls"):
            q.submit(":1.1", now, lambda: None, lambda f: None)
        q.submit(":1.2", now, lambda: None, lambda f: None)
        with pytest.raises(Busy, match="3 calls waiting or running"):
            q.submit(":1.3", now, lambda: None, lambda f: None)
    finally:
        release.set()
        q.shutdown()


def test_lane_refuses_a_call_that_waited_too_long_and_never_runs_it():
    ran = threading.Event()
    box: list[Future] = []
    q = lane(LaneLimits(workers=1, admitted=4, per_caller=4, max_wait=20))
    try:
        q.submit(":1.1", time.monotonic() - 21, ran.set, box.append)
        with pytest.raises(Busy, match="waited 21 s"):
            wait_for(box).result()
        assert not ran.is_set()
        again: list[Future] = []
        q.submit(":1.1", time.monotonic(), lambda: "ok", again.append)  # the slot is free
        assert wait_for(again).result() == "ok"
    finally:
        q.shutdown()


def test_lane_drops_a_call_whose_caller_left():
    ran = threading.Event()
    asked: list[str] = []
    box: list[Future] = []

    def present(caller: str) -> bool:
        asked.append(caller)
        return False

    q = lane(LaneLimits(workers=1, admitted=4, per_caller=4, max_wait=20), present)
    try:
        q.submit(":1.7", time.monotonic() - 5, ran.set, box.append)
        with pytest.raises(Busy, match="left the bus"):
            wait_for(box).result()
        assert asked == [":1.7"] and not ran.is_set()
        box.clear()
        q.submit(":1.7", time.monotonic(), lambda: 42, box.append)   # fresh: not asked
        assert wait_for(box).result() == 42 and asked == [":1.7"]
    finally:
        q.shutdown()


def test_a_saturated_query_lane_does_not_delay_the_control_lane():
    release = threading.Event()
    query = lane(LaneLimits(workers=2, admitted=32, per_caller=32, max_wait=60))
    control = lane(LaneLimits(workers=2, admitted=16, per_caller=4, max_wait=60))
    box: list[Future] = []
    try:
        for _ in range(32):
            query.submit(":1.50", time.monotonic(), release.wait, lambda f: None)
        started = time.monotonic()
        control.submit(":1.1", time.monotonic(), lambda: "cancelled", box.append)
        assert wait_for(box).result() == "cancelled"
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        query.shutdown()
        control.shutdown()


