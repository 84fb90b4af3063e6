"""Output helpers shared by `relaunchctl` commands: JSON, progress, sizes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def progress_printer(label: str, minimum: int = 32 << 20) -> Callable[[int, int], None] | None:
    """A progress callback that draws on stderr when it is a terminal and the
    work is large enough to be worth watching; None otherwise."""
    if not sys.stderr.isatty():
        return None
    state = {"last": 0.0}

    def report(done: int, total: int) -> None:
        if total < minimum:
            return
        now = time.monotonic()
        if done < total and now - state["last"] < 0.1:
            return
        state["last"] = now
        pct = 100 * done // max(total, 1)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label}: {pct:3d}% of {human_size(total)}{end}")
        sys.stderr.flush()

    return report
