"""relaunchd's errors as D-Bus error names and back (`org.relaunchd.Relaunch1.Error.<Name>`).

The service replies with the error's `name`; the client turns a reply back into the same
`RelaunchError` class, so `relaunchctl` prints what the engine raised.
"""

from __future__ import annotations

import re

from gi.repository import GLib

from relaunchd.bus.names import ACCESS_DENIED, DBUS_ERROR, ERROR_PREFIX, INTERACTIVE_REQUIRED
from relaunchd.errors import NoDaemon, RelaunchError, error_named


def dbus_error(exc: BaseException) -> tuple[str, str]:
    """The D-Bus error name and message for an exception raised while serving a call."""
    if isinstance(exc, RelaunchError):
        return ERROR_PREFIX + exc.name, str(exc)
    return ERROR_PREFIX + "Internal", f"internal error: {type(exc).__name__}: {exc}"



_UNREACHABLE = {"ServiceUnknown", "NameHasNoOwner", "NoReply", "Disconnected", "NoServer",
                "SpawnFailed", "SpawnChildExited", "SpawnExecFailed", "FileNotFound",
                "TimedOut", "Timeout"}


def client_error(exc: GLib.Error) -> RelaunchError:
    """A GLib.Error from a call to relaunchd as the matching `RelaunchError`."""
    # GDBus keeps the remote name in the message ("GDBus.Error:<name>: <text>"); a local
    # failure (closed connection, timeout) has no such prefix.
    match = re.match(r"GDBus\.Error:([^\s:]+): ?(.*)", exc.message, re.S)
    remote, message = match.groups() if match else ("", exc.message)
    if remote.startswith(ERROR_PREFIX):
        name = remote[len(ERROR_PREFIX):]
    elif remote in (ACCESS_DENIED, INTERACTIVE_REQUIRED):
        name = "AccessDenied"
    elif not remote or remote.removeprefix(DBUS_ERROR) in _UNREACHABLE:
        return NoDaemon(f"relaunchd is not reachable: {message}")
    else:
        name = remote.rsplit(".", 1)[-1]
    cls = error_named(name)
    if cls is not None:
        return cls(message)
    err = RelaunchError(message)
    err.name = name
    return err
