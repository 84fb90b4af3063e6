"""relaunchd's errors as D-Bus error names and back (relaunchd.bus.error_names): every
named error the service replies with comes back to the client as the same class, with the
same message; authorization and an absent daemon have their own classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gi.repository import Gio, GLib

from relaunchd import errors
from relaunchd.bus.error_names import client_error, dbus_error
from relaunchd.bus.names import ERROR_PREFIX
from relaunchd.errors import AccessDenied, NoDaemon, RelaunchError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "dbus-api.md"
# Raised in the client, never sent by the service: Interrupted by `relaunchctl relaunch
# --wait` (a stop signal while the system runs), InvalidVolume by `relaunchctl check`'s
# local sealed-volume reading.
CLIENT_SIDE = {"NoDaemon", "AccessDenied", "Interrupted", "InvalidVolume"}




def remote(name: str, message: str) -> GLib.Error:
    """What GDBus hands a client for an error reply (`GDBus.Error:<name>: <message>`)."""
    return GLib.Error.new_literal(Gio.io_error_quark(), f"GDBus.Error:{name}: {message}", 0)


@pytest.mark.parametrize("cls", errors.all_errors(), ids=lambda c: c.__name__)
def test_every_error_makes_the_round_trip(cls):
    name, message = dbus_error(cls("what happened: x"))
    assert name == ERROR_PREFIX + cls.name
    back = client_error(remote(name, message))
    assert type(back) is cls and str(back) == "what happened: x"


def test_every_error_the_service_can_send_is_documented():
    text = DOCS.read_text()
    section = text[text.index("## Errors"):text.index("## Authorization")]
    documented = set(re.findall(r"`(\w+)`", section))
    sent = {cls.name for cls in errors.all_errors()} - CLIENT_SIDE
    assert sent - documented == set()
    assert "Internal" in documented


def test_anything_else_is_internal():
    name, message = dbus_error(KeyError("k"))
    assert name == ERROR_PREFIX + "Internal"
    assert message == "internal error: KeyError: 'k'"
    back = client_error(remote(name, message))
    assert type(back) is RelaunchError and back.name == "Internal"


@pytest.mark.parametrize("name", ["org.freedesktop.DBus.Error.AccessDenied",
                                  "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"])
def test_authorization_failures(name):
    assert isinstance(client_error(remote(name, "polkit said no")), AccessDenied)


@pytest.mark.parametrize("name", ["ServiceUnknown", "NameHasNoOwner", "NoReply", "Disconnected",
                                  "SpawnFailed", "TimedOut"])
def test_an_unreachable_daemon(name):
    error = client_error(remote(f"org.freedesktop.DBus.Error.{name}", "gone"))
    assert isinstance(error, NoDaemon) and "not reachable: gone" in str(error)


def test_a_local_failure_without_a_remote_name_is_no_daemon():
    error = client_error(GLib.Error.new_literal(Gio.io_error_quark(), "Connection closed", 0))
    assert isinstance(error, NoDaemon) and "Connection closed" in str(error)


def test_a_name_this_client_does_not_know_keeps_its_name():
    error = client_error(remote("org.freedesktop.DBus.Error.InvalidArgs", "bad signature"))
    assert type(error) is RelaunchError and error.name == "InvalidArgs"
    newer = client_error(remote(ERROR_PREFIX + "FromTheFuture", "m"))
    assert newer.name == "FromTheFuture" and str(newer) == "m"
