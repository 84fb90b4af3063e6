"""logind's inhibitor locks over D-Bus (`ListInhibitors`), for the platform's
`InhibitorSource` (platform.inhibitors holds the record and which locks block)."""

from __future__ import annotations

import re

from gi.repository import Gio, GLib

from relaunchd.errors import RelaunchError
from relaunchd.platform.inhibitors import Inhibitor, LogindUnavailable

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
REPLY_TYPE = "(a(ssssuu))"
DEFAULT_TIMEOUT_MS = 5000

# Nobody owns the name and the bus cannot activate it: logind is not running.
_ABSENT = {"org.freedesktop.DBus.Error.ServiceUnknown",
           "org.freedesktop.DBus.Error.NameHasNoOwner"}


class LogindInhibitors:
    """`InhibitorSource` over a connection (default: the shared system bus connection)."""

    def __init__(self, connection: Gio.DBusConnection | None = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS) -> None:
        self._connection = connection
        self._timeout_ms = timeout_ms

    def list_inhibitors(self) -> list[Inhibitor]:
        return list_inhibitors(self._connection, self._timeout_ms)


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
                    timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[Inhibitor]:
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
