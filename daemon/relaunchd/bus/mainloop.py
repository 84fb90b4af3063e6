"""The system bus connection and the GLib main loop the daemon sleeps in."""

from __future__ import annotations

from collections.abc import Callable

import pydbus
from gi.repository import Gio, GLib

# What connecting and owning the name can raise (for adapters that must not import gi).
FAILURES = (GLib.Error, RuntimeError)


def system_bus() -> Gio.DBusConnection:
    """The system bus (or the one DBUS_SYSTEM_BUS_ADDRESS names), via pydbus."""
    return pydbus.SystemBus().con


def main_loop() -> GLib.MainLoop:
    return GLib.MainLoop()


def on_unix_signal(signum: int, handler: Callable[[], None]) -> None:
    """Run `handler` on the main loop when `signum` arrives (signalfd-style: no polling)."""
    def fire() -> bool:
        handler()
        return True
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, fire)


def every(seconds: float, handler: Callable[[], None]) -> None:
    def fire() -> bool:
        handler()
        return True
    GLib.timeout_add(max(1, int(seconds * 1000)), fire)
