"""logind inhibitor locks: who is holding off a shutdown right now (platform layer).

`systemctl kexec` refuses while a `block` shutdown lock is held, but relaunchd goes
through `systemctl start kexec.target`, which logind never sees — so relaunchd has to
ask logind itself. Asking is D-Bus, so it lives in the bus adapter (`bus.logind`) behind
the `InhibitorSource` interface here; this module holds the record and the rule of which
locks block. What a held lock means (refuse, wait, `force`) is the engine's decision, and
so is what an absent logind means.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from relaunchd.errors import RelaunchError


class LogindUnavailable(RelaunchError):
    """logind is not on the system bus, or there is no system bus to ask it on."""

    name = "LogindUnavailable"


@dataclass(frozen=True)
class Inhibitor:
    what: str      # colon-separated: "shutdown:sleep", "idle", "handle-power-key", ...
    who: str
    why: str
    mode: str      # "block", "delay" ("block-weak" too on systemd >= 257)
    uid: int
    pid: int

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(self.what.split(":"))


class InhibitorSource(Protocol):
    def list_inhibitors(self) -> list[Inhibitor]:
        """Every inhibitor lock logind holds now. LogindUnavailable when there is no logind
        or no system bus; RelaunchError for any other failure."""


def blocking_shutdown(inhibitors: Iterable[Inhibitor]) -> list[Inhibitor]:
    """The locks that make a kexec wait: mode `block` on the `shutdown` operation (logind
    counts kexec as a shutdown; `delay` locks only postpone it by InhibitDelayMaxSec)."""
    return [i for i in inhibitors if i.mode == "block" and "shutdown" in i.operations]
