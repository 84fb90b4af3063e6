"""logind inhibitor locks: who is holding off a shutdown right now (platform layer).

`systemctl kexec` refuses while a `block` shutdown lock is held, but relaunchd goes
through `systemctl start kexec.target`, which logind never sees — so relaunchd has to
ask logind itself. This module only reports; what a held lock means (refuse, wait,
`force`) is the engine's decision, and so is what an absent logind means.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gi.repository import Gio, GLib

from relaunchd.errors import RelaunchError

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
REPLY_TYPE = "(a(ssssuu))"

# Nobody owns the name and the bus cannot activate it: logind is not running.
_ABSENT = {"org.freedesktop.DBus.Error.ServiceUnknown",
           "org.freedesktop.DBus.Error.NameHasNoOwner"}


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


def _failure(exc: GLib.Error, timeout_ms: int) -> RelaunchError:
    # GDBus keeps a remote error's D-Bus name only in the message text
    # ("GDBus.Error:<name>: <text>"); local failures (timeout, closed) have no prefix.
    match = re.match(r"GDBus\.Error:([^\s:]+): ?(.*)", exc.message, re.S)
    if match:
        remote, text = match.groups()
        if remote in _ABSENT:
            return LogindUnavailable(f"logind is not on the system bus ({remote}: {text})")
        return RelaunchError(f"logind ListInhibitors failed: {remote}: {text}")
    if exc.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED):
        return LogindUnavailable(f"the system bus connection is closed: {exc.message}")
    if exc.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT):
        return RelaunchError(f"logind ListInhibitors failed: no answer within {timeout_ms} ms")
    return RelaunchError(f"logind ListInhibitors failed: {exc.message}")


def list_inhibitors(connection: Gio.DBusConnection | None = None,
                    timeout_ms: int = 5000) -> list[Inhibitor]:
    """Every inhibitor lock logind holds now (`ListInhibitors`), over `connection`
    (default: the shared system bus connection).

    Raises LogindUnavailable when there is no logind or no system bus, RelaunchError
    naming the D-Bus error for any other failure (including no answer in `timeout_ms`)."""
    if connection is None:
        try:
            connection = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        except GLib.Error as exc:
            raise LogindUnavailable(f"no system bus: {exc.message}") from None
    try:
        # The reply type makes GDBus reject a malformed answer instead of unpacking it.
        reply = connection.call_sync(
            LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER, "ListInhibitors", None,
            GLib.VariantType.new(REPLY_TYPE), Gio.DBusCallFlags.NONE, timeout_ms, None)
    except GLib.Error as exc:
        raise _failure(exc, timeout_ms) from None
    return [Inhibitor(*row) for row in reply.unpack()[0]]


def blocking_shutdown(inhibitors: Iterable[Inhibitor]) -> list[Inhibitor]:
    """The locks that make a kexec wait: mode `block` on the `shutdown` operation (logind
    counts kexec as a shutdown; `delay` locks only postpone it by InhibitDelayMaxSec)."""
    return [i for i in inhibitors if i.mode == "block" and "shutdown" in i.operations]
