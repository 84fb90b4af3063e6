"""How relaunchd's bus service schedules calls (issue #14, item 3), piece by piece:
admission before the main loop (`bus.admission`), the two worker lanes with their bounds
and staleness checks (`bus.call_lanes`), the shared Check result (`bus.shared_results`)
and the delayed Busy replies. tests/integration/test_security_bus.py floods the real
service; benchmarks/bus_starvation.py measures it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from relaunchd.bus.admission import Admission, AdmissionLimits, DelayedReplies
from relaunchd.bus.call_lanes import Lane, LaneLimits
from relaunchd.bus.shared_results import SharedResults
from relaunchd.errors import Busy

CONTROL = {"Stage", "Relaunch", "Rehearse", "Cancel"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ admission

def test_admission_bounds_each_caller_and_the_open_calls():
    admission = Admission(CONTROL, AdmissionLimits(per_caller=3, open_calls=4))
    for serial in range(3):
        admission.admit(":1.1", serial, "Check")
    with pytest.raises(Busy, match="3 of your calls"):
        admission.admit(":1.1", 99, "Check")
    admission.admit(":1.2", 1, "Check")           # 4 open calls now
    with pytest.raises(Busy, match="4 calls outstanding"):
        admission.admit(":1.2", 2, "ListImages")
    admission.admit(":1.3", 1, "GetAll")          # a caller's first call always gets in
    admission.admit(":1.2", 3, "Cancel")          # control calls are not open calls
    admission.admit(":1.2", 4, "Stage")
    with pytest.raises(Busy, match="calls outstanding"):
        admission.admit(":1.3", 2, "Check")       # its second open call shares the bound
    admission.release(":1.1", 0)
    admission.release(":1.1", 1)
    admission.admit(":1.3", 2, "Check")           # room again
    assert admission.outstanding() == 6


def test_admission_release_is_exact_and_stale_entries_expire():
    clock = Clock()
    admission = Admission(CONTROL, AdmissionLimits(per_caller=2, open_calls=10,
                                                   stale_after=60), clock=clock)
    admission.admit(":1.1", 1, "Check")
    admission.admit(":1.1", 2, "Check")
    admission.release(":1.1", 7)                  # not ours: nothing changes
    admission.release(":1.9", 1)
    with pytest.raises(Busy):
        admission.admit(":1.1", 3, "Check")
    clock.now += 61                               # answered by GDBus itself, never by us
    admission.admit(":1.1", 3, "Check")
    assert admission.outstanding() == 1


def test_delayed_replies_go_out_late_and_in_order():
    sent: list[tuple[float, str]] = []
    replies = DelayedReplies(lambda r: sent.append((time.monotonic(), r)), delay=0.3)
    try:
        start = time.monotonic()
        replies.add("a")
        replies.add("b")
        assert sent == []
        deadline = time.monotonic() + 5
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r for _, r in sent] == ["a", "b"]
        assert all(at - start >= 0.29 for at, _ in sent)
    finally:
        replies.close()


def test_delayed_replies_overflow_and_close_send_at_once():
    sent: list[str] = []
    replies = DelayedReplies(sent.append, delay=60, limit=2)
    replies.add("a")
    replies.add("b")
    replies.add("c")                              # over the limit: now
    assert sent == ["c"]
    replies.close()                               # nothing is kept back at exit
    assert sorted(sent) == ["a", "b", "c"]


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
