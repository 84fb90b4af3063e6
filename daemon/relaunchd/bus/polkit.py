"""polkit authorization of D-Bus callers (ecosystem.md §3; docs/dbus-api.md "Authorization").

`CheckAuthorization` for the caller's unique bus name (a `system-bus-name` subject: race-free,
unlike a PID), asynchronously so a slow or interactive check never blocks the main loop;
interaction only when the caller's message allows it (as systemd does). Without polkitd on the
machine, uid 0 may act and nobody else can be authorized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gi.repository import Gio, GLib

from relaunchd.bus.names import ACCESS_DENIED, DBUS_ERROR, INTERACTIVE_REQUIRED

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
# polkit is "absent" (uid 0 may proceed) only for these; any other failure denies.
POLKIT_ABSENT = {DBUS_ERROR + "ServiceUnknown", DBUS_ERROR + "NameHasNoOwner"}
POLKIT_INTERACTIVE_TIMEOUT_MS = 5 * 60 * 1000   # a human may be typing a password
CHECK_ALLOW_INTERACTION = 1                     # CheckAuthorizationFlags

Denied = Callable[[str, str], None]              # (D-Bus error name, message)


def authorize(connection: Gio.DBusConnection, sender: str, action: str,
              details: dict[str, str], *, interactive: bool, allowed: Callable[[], None],
              denied: Denied) -> None:
    """Call `allowed()` or `denied(error, message)` on the main loop once polkit decided."""
    subject = ("system-bus-name", {"name": GLib.Variant("s", sender)})
    flags = CHECK_ALLOW_INTERACTION if interactive else 0
    params = GLib.Variant("((sa{sv})sa{ss}us)", (subject, action, details, flags, ""))

    def checked(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
        try:
            is_authorized, challenge, _ = con.call_finish(result).unpack()[0]
        except GLib.Error as exc:
            if Gio.DBusError.get_remote_error(exc) in POLKIT_ABSENT:
                _root_only(con, sender, action, allowed, denied)
            else:
                log.warning("polkit check for %s failed: %s", action, exc.message)
                denied(ACCESS_DENIED, f"{action}: authorization check failed")
            return
        if is_authorized:
            allowed()
        elif challenge and not interactive:
            denied(INTERACTIVE_REQUIRED, f"{action} needs authentication; call with "
                                         "interactive authorization allowed")
        else:
            denied(ACCESS_DENIED, f"{action}: not authorized")

    connection.call(POLKIT_NAME, POLKIT_PATH, POLKIT_IFACE, "CheckAuthorization", params,
                    GLib.VariantType("((bba{ss}))"), Gio.DBusCallFlags.NONE,
                    POLKIT_INTERACTIVE_TIMEOUT_MS if interactive else -1, None, checked)


def _root_only(connection: Gio.DBusConnection, sender: str, action: str,
               allowed: Callable[[], None], denied: Denied) -> None:
    """No polkitd on this machine: root may act, nobody else can be authorized."""
    def got_uid(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
        try:
            uid = con.call_finish(result).unpack()[0]
        except GLib.Error as exc:
            denied(ACCESS_DENIED, f"{action}: {exc.message}")
            return
        if uid == 0:
            allowed()
        else:
            denied(ACCESS_DENIED, f"{action}: not authorized (polkit is not available)")

    connection.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                    "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)),
                    GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None, got_uid)
