"""bus.admission: calls counted in before they queue for the main loop, per caller and in
all, and the delayed Busy replies.
The whole service is flooded in tests/integration/test_security_bus.py and measured by
benchmarks/bus_starvation.py (issue #14, item 3)."""

from __future__ import annotations

import time

import pytest

from relaunchd.bus.admission import Admission, AdmissionLimits, DelayedReplies
from relaunchd.errors import Busy
from support.fake_clock import Clock

CONTROL = {"Stage", "Relaunch", "Rehearse", "Cancel"}


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


