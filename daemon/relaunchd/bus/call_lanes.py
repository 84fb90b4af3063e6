"""Where relaunchd's D-Bus method calls wait for a worker (bus layer; issue #14).

Two lanes, each with its own threads, so an unprivileged flood can never delay a
privileged call:

- **control**: the calls polkit authorized to change something (Stage, Relaunch,
  Rehearse, Cancel). Its workers serve nothing else.
- **query**: everything else that does work (Check, ListImages, GetHistory, Inspect).

Each lane admits a bounded number of calls (waiting or running), at most a few per caller
(unique bus name); beyond that the call is answered `Busy` at once instead of queued. A
call that has waited longer than `max_wait` when a worker takes it is answered `Busy` and
not run, and so is one whose caller has left the bus: D-Bus carries no deadline, but the
default method-call timeout of libdbus and GDBus is 25 s, so a call refused after 20 s
never runs behind the back of a default-timeout client that gave up on it (and a client
that gave up and exited is seen to be gone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relaunchd.errors import Busy

log = logging.getLogger(__name__)

# A call taken within this many seconds of its arrival is taken for granted to have a
# caller still waiting: asking the bus costs a round trip per call.
PRESENCE_CHECK_AFTER = 1.0


@dataclass(frozen=True)
class LaneLimits:
    workers: int
    admitted: int           # calls waiting or running, at most
    per_caller: int         # of those, from one caller
    max_wait: float         # seconds a call may wait for a worker and still run


CONTROL = LaneLimits(workers=2, admitted=16, per_caller=4, max_wait=20.0)
QUERY = LaneLimits(workers=2, admitted=32, per_caller=4, max_wait=20.0)


class Lane:
    """A pool of workers with admission bounds and a staleness check before each call."""

    def __init__(self, name: str, limits: LaneLimits,
                 caller_present: Callable[[str], bool]) -> None:
        self.name = name
        self.limits = limits
        self._caller_present = caller_present
        self._pool = ThreadPoolExecutor(max_workers=limits.workers,
                                        thread_name_prefix=f"bus-{name}")
        self._lock = threading.Lock()
        self._admitted = 0
        self._by_caller: Counter[str] = Counter()

    def submit(self, caller: str, arrived: float, work: Callable[[], Any],
               done: Callable[[Future], None]) -> None:
        """Queue `work` for `caller` (arrived: time.monotonic() when the call came in);
        `done(future)` runs in the worker when it finished or was refused. Raises Busy when
        the lane or this caller's share of it is full, RuntimeError when shut down."""
        with self._lock:
            if self._admitted >= self.limits.admitted:
                raise Busy(f"relaunchd is busy ({self._admitted} calls waiting or running "
                           f"in its {self.name} lane); try again later")
            if self._by_caller[caller] >= self.limits.per_caller:
                raise Busy(f"{self._by_caller[caller]} of your calls are still waiting or "
                           "running; wait for their replies")
            self._admitted += 1
            self._by_caller[caller] += 1

        def run() -> Any:
            try:
                waited = time.monotonic() - arrived
                if waited > self.limits.max_wait:
                    raise Busy(f"the call waited {waited:.0f} s for a worker and was not run "
                               "(longer than a caller with the default timeout waits)")
                if waited > PRESENCE_CHECK_AFTER and not self._caller_present(caller):
                    log.info("%s left the bus before its call ran; not run", caller)
                    raise Busy("the caller left the bus before a worker was free; not run")
                return work()
            finally:
                self._release(caller)

        try:
            future = self._pool.submit(run)
        except RuntimeError:
            self._release(caller)
            raise
        future.add_done_callback(done)

    def _release(self, caller: str) -> None:
        with self._lock:
            self._admitted -= 1
            self._by_caller[caller] -= 1
            if self._by_caller[caller] <= 0:
                del self._by_caller[caller]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
