"""The names relaunchd uses on D-Bus (relaunchd.bus.names) are those of the shipped files:
the introspection XML (the one definition of the interface, installed as package data),
the bus policy, the activation file and the polkit actions."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gi.repository import Gio

from relaunchd.bus import names
from relaunchd.bus import service as bus_service
from relaunchd.bus.service import PROPERTY_OF

UNITS = Path(__file__).resolve().parents[3] / "units"
PACKAGE = Path(names.__file__).parent


def test_the_interface_xml_is_package_data_and_defines_the_interface():
    assert (PACKAGE / names.INTROSPECTION_XML).is_file()
    node = Gio.DBusNodeInfo.new_for_xml(names.introspection_xml())
    iface = node.lookup_interface(names.INTERFACE)
    assert iface is not None
    assert {m.name for m in iface.methods} == {"Check", "ListImages", "Inspect", "Stage",
                                               "Relaunch", "Rehearse", "Cancel", "GetHistory"}
    assert {p.name for p in iface.properties} == set(PROPERTY_OF.values())
    assert all(p.flags == Gio.DBusPropertyInfoFlags.READABLE for p in iface.properties)


def test_the_bus_policy_names_the_service_and_the_interface():
    policy = ET.parse(UNITS / "org.relaunchd.Relaunch1.conf").getroot()
    owned = {e.get("own") for e in policy.iter("allow") if e.get("own")}
    assert owned == {names.BUS_NAME}
    interfaces = {e.get("send_interface") for e in policy.iter("allow")
                  if e.get("send_interface")}
    assert names.INTERFACE in interfaces and names.PROPERTIES_IFACE in interfaces


def test_the_bus_policy_lets_everyone_send_each_method_by_name():
    """Every method of the introspection XML has its own allow rule in the default
    context, and nothing else of the interface is allowed: a method missing here would be
    refused by dbus-daemon for non-root callers before polkit could decide."""
    xml = ET.parse(Path(bus_service.__file__).with_name(
        "org.relaunchd.Relaunch1.Manager.xml")).getroot()
    methods = {m.get("name") for m in xml.iter("method")}
    policy = ET.parse(UNITS / "org.relaunchd.Relaunch1.conf").getroot()
    default = next(p for p in policy.iter("policy") if p.get("context") == "default")
    rules = [e.attrib for e in default.iter("allow")
             if e.get("send_interface") == names.INTERFACE]
    assert all(r.get("send_destination") == names.BUS_NAME for r in rules)
    assert sorted(r.get("send_member") for r in rules) == sorted(methods)


def test_the_activation_file_names_the_service():
    text = (UNITS / "org.relaunchd.Relaunch1.service").read_text()
    assert re.search(rf"^Name={re.escape(names.BUS_NAME)}$", text, re.M)


def test_the_polkit_actions_carry_the_prefix():
    actions = {a.get("id") for a in ET.parse(UNITS / "org.relaunchd.relaunch1.policy")
               .getroot().iter("action")}
    assert actions == {names.ACTION_PREFIX + a for a in ("stage", "relaunch", "cancel",
                                                         "inspect")}


def test_the_object_path_and_error_prefix_follow_the_bus_name():
    assert "/" + names.BUS_NAME.replace(".", "/") == names.OBJECT_PATH
    assert names.ERROR_PREFIX == names.BUS_NAME + ".Error."
    assert names.INTERFACE.startswith(names.BUS_NAME + ".")
    assert names.ACCESS_DENIED == "org.freedesktop.DBus.Error.AccessDenied"
