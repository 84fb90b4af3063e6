"""The names relaunchd uses on D-Bus, and the interface definition (docs/dbus-api.md)."""

from __future__ import annotations

from importlib import resources

BUS_NAME = "org.relaunchd.Relaunch1"
OBJECT_PATH = "/org/relaunchd/Relaunch1"
INTERFACE = "org.relaunchd.Relaunch1.Manager"
ERROR_PREFIX = "org.relaunchd.Relaunch1.Error."
INTROSPECTION_XML = "org.relaunchd.Relaunch1.Manager.xml"
ACTION_PREFIX = "org.relaunchd.relaunch1."

DBUS_ERROR = "org.freedesktop.DBus.Error."
ACCESS_DENIED = DBUS_ERROR + "AccessDenied"
INTERACTIVE_REQUIRED = DBUS_ERROR + "InteractiveAuthorizationRequired"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"


def introspection_xml() -> str:
    """The shipped XML — the one definition of the interface."""
    return (resources.files(__package__) / INTROSPECTION_XML).read_text()
