"""One computation at a time per key, its result reused for a while (bus layer; issue #14).

`Check` runs a readiness probe whose answer is the same for every caller; a flood of
Checks from any local user must cost one probe, not one per call. Calls for a key whose
computation is running wait for it; a result is reused for `ttl` seconds; a failure is
not kept. Used from the GLib main loop only, so it needs no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from relaunchd.errors import Busy

Value = TypeVar("Value")
Waiter = TypeVar("Waiter")


@dataclass
class _Entry(Generic[Value, Waiter]):
    value: Value | None = None
    computed_at: float = 0.0
    waiters: list[Waiter] = field(default_factory=list)   # non-empty while computing


class SharedResults(Generic[Value, Waiter]):
    def __init__(self, ttl: float, max_waiters: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_waiters = max_waiters
        self._clock = clock
        self._entries: dict[Hashable, _Entry[Value, Waiter]] = {}

    def fresh(self, key: Hashable) -> Value | None:
        """The result for `key` if one was computed less than `ttl` seconds ago."""
        entry = self._entries.get(key)
        if entry is None or entry.value is None or self._clock() - entry.computed_at > self.ttl:
            return None
        return entry.value

    def join(self, key: Hashable, waiter: Waiter) -> bool:
        """Wait for `key`: True when a computation is running already (the waiter gets its
        result), False when the caller must start one (the waiter is recorded for it).
        Busy when too many are waiting."""
        entry = self._entries.setdefault(key, _Entry())
        if len(entry.waiters) >= self.max_waiters:
            raise Busy(f"{len(entry.waiters)} identical calls are waiting already; "
                       "try again later")
        running = bool(entry.waiters)
        entry.waiters.append(waiter)
        return running

    def finish(self, key: Hashable, value: Value | None) -> list[Waiter]:
        """The computation for `key` ended (value None: it failed, keep nothing); the
        waiters to answer."""
        entry = self._entries.setdefault(key, _Entry())
        waiters, entry.waiters = entry.waiters, []
        if value is not None:
            entry.value, entry.computed_at = value, self._clock()
        return waiters
