"""The client side of `org.relaunchd.Relaunch1`: what `relaunchctl` talks to the daemon with,
so the CLI never touches the binding itself."""

from __future__ import annotations

from typing import Any

import pydbus
from gi.repository import Gio, GLib

from relaunchd.bus.error_names import client_error
from relaunchd.bus.names import BUS_NAME, INTERFACE, OBJECT_PATH, PROPERTIES_IFACE
from relaunchd.bus.variants import to_vardict
from relaunchd.errors import NoDaemon


class Client:
    """A connection to relaunchd for `relaunchctl` (blocking calls, signals on demand)."""

    def __init__(self, timeout_ms: int = 60_000, address: str | None = None) -> None:
        """`address`: a private connection to that bus (tests, benchmarks) instead of the
        process-wide system bus connection."""
        try:
            if address:
                self._con = Gio.DBusConnection.new_for_address_sync(
                    address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
            else:
                self._con = pydbus.SystemBus().con
        except GLib.Error as exc:
            raise NoDaemon(f"no system bus: {exc.message}") from None
        # The shared connection would SIGTERM us when the bus goes away; `relaunch --wait`
        # wants to see that as "the system is going down" instead.
        self._con.set_exit_on_close(False)
        self._timeout = timeout_ms

    @property
    def unique_name(self) -> str:
        return self._con.get_unique_name()

    def available(self) -> bool:
        """True when relaunchd runs or the bus can activate it."""
        try:
            if self._bus_call("NameHasOwner", "(s)", (BUS_NAME,)):
                return True
            return BUS_NAME in self._bus_call("ListActivatableNames", "()", ())
        except GLib.Error:
            return False

    def _bus_call(self, method: str, sig: str, args: tuple) -> Any:
        reply = self._con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                    "org.freedesktop.DBus", method, GLib.Variant(sig, args),
                                    None, Gio.DBusCallFlags.NONE, 5000, None)
        return reply.unpack()[0]

    def call(self, method: str, *args: Any, options: dict | None = None,
             interactive: bool = False) -> Any:
        """Call a Manager method; `args` are the leading string arguments."""
        sig = "(" + "s" * len(args) + "a{sv})"
        params = GLib.Variant(sig, (*args, to_vardict(options)))
        flags = (Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION if interactive
                 else Gio.DBusCallFlags.NONE)
        try:
            reply = self._con.call_sync(BUS_NAME, OBJECT_PATH, INTERFACE, method, params,
                                        None, flags, self._timeout, None)
        except GLib.Error as exc:
            raise client_error(exc) from None
        values = reply.unpack()
        return values[0] if values else None

    def properties(self) -> dict[str, Any]:
        try:
            reply = self._con.call_sync(BUS_NAME, OBJECT_PATH, PROPERTIES_IFACE, "GetAll",
                                        GLib.Variant("(s)", (INTERFACE,)), None,
                                        Gio.DBusCallFlags.NONE, self._timeout, None)
        except GLib.Error as exc:
            raise client_error(exc) from None
        return reply.unpack()[0]

    def get(self, name: str) -> Any:
        try:
            reply = self._con.call_sync(BUS_NAME, OBJECT_PATH, PROPERTIES_IFACE, "Get",
                                        GLib.Variant("(ss)", (INTERFACE, name)), None,
                                        Gio.DBusCallFlags.NONE, self._timeout, None)
        except GLib.Error as exc:
            raise client_error(exc) from None
        return reply.unpack()[0]

    def watch(self) -> Watch:
        """Subscribe to PropertiesChanged and to the daemon leaving — before the call whose
        effect is watched, so nothing is missed (the systemd JobRemoved recipe)."""
        return Watch(self._con)


class Watch:
    """Property changes and the daemon's disappearance, collected on a private main loop."""

    def __init__(self, con: Gio.DBusConnection) -> None:
        self._con = con
        self._loop = GLib.MainLoop()
        self.changes: list[dict[str, Any]] = []
        self.gone = False
        self._subs = [
            con.signal_subscribe(BUS_NAME, PROPERTIES_IFACE, "PropertiesChanged", OBJECT_PATH,
                                 INTERFACE, Gio.DBusSignalFlags.NONE, self._changed),
            con.signal_subscribe("org.freedesktop.DBus", "org.freedesktop.DBus",
                                 "NameOwnerChanged", "/org/freedesktop/DBus", BUS_NAME,
                                 Gio.DBusSignalFlags.NONE, self._owner),
        ]
        self._closed = con.connect("closed", self._on_closed)

    def _changed(self, *args: Any) -> None:
        self.changes.append(args[-1].unpack()[1])
        self._loop.quit()

    def _owner(self, *args: Any) -> None:
        _name, _old, new = args[-1].unpack()
        if not new:
            self.gone = True
            self._loop.quit()

    def _on_closed(self, *_args: Any) -> None:
        self.gone = True
        self._loop.quit()

    def next(self, timeout: float) -> list[dict[str, Any]]:
        """Wait up to `timeout` s for news; return the changes collected since last time."""
        if not self.changes and not self.gone:
            fired: list[bool] = []

            def expire() -> bool:
                fired.append(True)
                self._loop.quit()
                return False

            source = GLib.timeout_add(max(1, int(timeout * 1000)), expire)
            self._loop.run()
            if not fired:
                GLib.source_remove(source)
        changes, self.changes = self.changes, []
        return changes

    def close(self) -> None:
        for sub in self._subs:
            self._con.signal_unsubscribe(sub)
        self._con.disconnect(self._closed)
