"""Admission of incoming method calls, before they queue for the main loop (bus layer;
issue #14).

Every call to relaunchd's object waits in one queue for the GLib main loop, which reads
each, authorizes it and replies. However cheap each of those steps is, a local user who
keeps hundreds of calls outstanding makes a privileged caller wait behind all of them. So
GDBus's message filter (which sees each message in GDBus's own thread, before it is queued)
admits a call only while its caller has fewer than `per_caller` calls outstanding and,
for anything but the control methods, while fewer than `open_calls` such calls are
outstanding in all (a caller's first outstanding call is always admitted, so a monitor
or an admin polling properties is never refused); otherwise the caller gets `Busy` at once
from the filter and the main loop never sees the call. A privileged call then waits
behind at most `open_calls` others plus one per connected caller (dbus-daemon bounds
connections per user). An entry is released when relaunchd replies; entries older than `stale_after`
(a call GDBus answered itself) stop counting.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relaunchd.errors import Busy


@dataclass(frozen=True)
class AdmissionLimits:
    per_caller: int = 8        # a client waits for its replies; 8 outstanding is generous
    open_calls: int = 16       # all callers' calls other than the control methods
    stale_after: float = 600.0  # longer than any reply takes (polkit asks for ≤ 5 min)


DEFAULT_LIMITS = AdmissionLimits()


class DelayedReplies:
    """Sends each reply `delay` seconds after it was handed over, from its own thread.

    A refused call answered at once comes straight back (a caller that resends on every
    reply spins, and every message costs this process CPU to read and answer); answered
    later, a caller can refuse-loop at most (calls it keeps outstanding) / delay times a
    second. At most `limit` replies wait; beyond that they go out at once."""

    def __init__(self, send: Callable[[object], None], delay: float, limit: int = 20000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self.delay = delay
        self.limit = limit
        self._clock = clock
        self._queue: deque[tuple[float, object]] = deque()    # due times only grow
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bus-busy-replies",
                                        daemon=True)
        self._thread.start()

    def add(self, reply: object) -> None:
        with self._wake:
            if len(self._queue) >= self.limit or self._closed:
                immediate = True
            else:
                immediate = False
                self._queue.append((self._clock() + self.delay, reply))
                if len(self._queue) == 1:
                    self._wake.notify()
        if immediate:
            self._send(reply)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._queue
                                            or self._queue[0][0] > self._clock()):
                    timeout = self._queue[0][0] - self._clock() if self._queue else None
                    self._wake.wait(timeout)
                if self._closed:
                    due, self._queue = list(self._queue), deque()
                else:
                    due = []
                    now = self._clock()
                    while self._queue and self._queue[0][0] <= now:
                        due.append(self._queue.popleft())
            for _, reply in due:
                self._send(reply)
            if self._closed:
                return


class Admission:
    """Outstanding calls per (caller, serial); thread-safe (filter thread, main loop)."""

    def __init__(self, control: Iterable[str], limits: AdmissionLimits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.control = frozenset(control)
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, int], tuple[float, bool]] = {}   # → (since, open)
        self._by_caller: Counter[str] = Counter()
        self._open = 0
        self._next_expiry = 0.0

    def admit(self, caller: str, serial: int, member: str) -> None:
        """Count the call in, or raise Busy."""
        is_open = member not in self.control
        with self._lock:
            self._expire()
            if self._by_caller[caller] >= self.limits.per_caller:
                raise Busy(f"{self._by_caller[caller]} of your calls to relaunchd are "
                           "outstanding; wait for their replies")
            # A caller's first outstanding call always gets in (a monitor polling
            # properties, an admin's GetAll); only the calls beyond it share the bound.
            if is_open and self._by_caller[caller] and self._open >= self.limits.open_calls:
                raise Busy(f"relaunchd has {self._open} calls outstanding; try again later")
            self._calls[(caller, serial)] = (self._clock(), is_open)
            self._by_caller[caller] += 1
            self._open += is_open

    def release(self, caller: str, serial: int) -> None:
        with self._lock:
            self._drop((caller, serial))

    def outstanding(self) -> int:
        with self._lock:
            return len(self._calls)

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._calls.pop(key, None)
        if entry is None:
            return
        caller = key[0]
        self._by_caller[caller] -= 1
        if self._by_caller[caller] <= 0:
            del self._by_caller[caller]
        self._open -= entry[1]

    def _expire(self) -> None:
        now = self._clock()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0       # a sweep a second at most
        limit = now - self.limits.stale_after
        for key in [k for k, (since, _) in self._calls.items() if since < limit]:
            self._drop(key)
