"""The Progress property's values (relaunchd.engine.progress): a step, done/total, and an
overall percent in which verification (it reads the whole image) dominates."""

from __future__ import annotations

import itertools

import pytest

from relaunchd.engine.progress import IDLE_PROGRESS, STEP_SPAN, idle, progress_of


def test_idle_is_a_fresh_copy_each_time():
    one = idle()
    one["step"] = "changed"
    assert idle() == IDLE_PROGRESS == {"step": "", "done": 0, "total": 0, "percent": 0}


def test_the_steps_cover_zero_to_a_hundred_in_order():
    spans = list(STEP_SPAN.values())
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert STEP_SPAN["verifying"] == (2, 92)          # the long one


@pytest.mark.parametrize(("step", "done", "total", "percent"), [
    ("verifying", 0, 100, 2), ("verifying", 50, 100, 47), ("verifying", 100, 100, 92),
    ("verifying", 150, 100, 92),                      # done beyond total: capped
    ("verifying", 5, 0, 2),                           # total unknown: the step's start
    ("loading", 1, 2, 95), ("recording", 1, 1, 100),
    ("staged", 1, 1, 0),                              # not a step with a span
])
def test_percent_within_the_steps_span(step, done, total, percent):
    value = progress_of(step, done, total)
    assert value == {"step": step, "done": done, "total": total, "percent": percent}
    assert all(isinstance(value[k], int) for k in ("done", "total", "percent"))


def test_an_explicit_percent_wins():
    assert progress_of("handed off", 3, 3, 100)["percent"] == 100
    assert progress_of("measuring", 0, 3, 0)["percent"] == 0
