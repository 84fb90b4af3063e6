"""The Progress property's values: a step name, done/total, and an overall percent."""

from __future__ import annotations

IDLE_PROGRESS = {"step": "", "done": 0, "total": 0, "percent": 0}
# Overall percent per step: verification dominates (it reads the whole image).
STEP_SPAN = {"checking": (0, 1), "unloading": (1, 2), "verifying": (2, 92),
             "loading": (92, 98), "recording": (98, 100)}


def progress_of(step: str, done: int, total: int, percent: int | None = None) -> dict:
    if percent is None:
        low, high = STEP_SPAN.get(step, (0, 0))
        fraction = done / total if total > 0 else 0.0
        percent = int(low + (high - low) * min(1.0, fraction))
    return {"step": step, "done": int(done), "total": int(total), "percent": int(percent)}


def idle() -> dict:
    return dict(IDLE_PROGRESS)
