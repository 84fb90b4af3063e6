"""Engine values as D-Bus variants (relaunchd.bus.variants; docs/dbus-api.md): the type each
value gets, what is left out, the GVariant serialization round trip (what goes on the
wire), and the checks on the options a caller sends."""

from __future__ import annotations

from pathlib import Path

import pytest
from gi.repository import Gio, GLib

from relaunchd.bus.names import INTERFACE, introspection_xml
from relaunchd.bus.variants import (
    absolute_path,
    property_variant,
    to_vardict,
    to_variant,
    validate_options,
)
from relaunchd.errors import InvalidArgument


def on_the_wire(variant: GLib.Variant) -> GLib.Variant:
    """Serialized and read back untrusted, as a peer's bytes would be."""
    data = variant.get_data_as_bytes()
    back = GLib.Variant.new_from_bytes(GLib.VariantType.new(variant.get_type_string()),
                                       data, False)
    assert back.is_normal_form()
    return back


@pytest.mark.parametrize(("value", "signature", "unpacked"), [
    (True, "b", True),                       # a bool is not an int
    (0, "x", 0), (-(1 << 63), "x", -(1 << 63)), ((1 << 63) - 1, "x", (1 << 63) - 1),
    (1 << 63, "t", 1 << 63), ((1 << 64) - 1, "t", (1 << 64) - 1),
    (1 << 64, "s", str(1 << 64)), (-(1 << 63) - 1, "s", str(-(1 << 63) - 1)),
    (1.5, "d", 1.5), ("text", "s", "text"),
    (Path("/boot/x.efi"), "s", "/boot/x.efi"),            # anything else: its str()
])
def test_scalars(value, signature, unpacked):
    variant = to_variant(value)
    assert variant.get_type_string() == signature
    assert on_the_wire(variant).unpack() == unpacked


def test_containers_leave_out_none():
    variant = to_variant({"a": 1, "gone": None, "nested": {"x": [1, None, "y"]}, 7: "key"})
    assert variant.get_type_string() == "a{sv}"
    assert on_the_wire(variant).unpack() == {"a": 1, "nested": {"x": [1, "y"]}, "7": "key"}
    assert to_variant((1, "a")).get_type_string() == "av"
    assert to_vardict(None) == {}


def test_a_variant_passes_through():
    v = GLib.Variant("u", 5)
    assert to_variant(v) is v


def test_every_property_signature_is_one_property_variant_builds():
    node = Gio.DBusNodeInfo.new_for_xml(introspection_xml())
    signatures = {p.signature for p in node.lookup_interface(INTERFACE).properties}
    assert signatures == {"s", "a{sv}"}
    assert property_variant("a{sv}", {"a": None, "b": 1}).unpack() == {"b": 1}
    assert property_variant("a{sv}", None).unpack() == {}
    assert property_variant("s", "staged").unpack() == "staged"
    assert property_variant("s", None).unpack() == ""


SCHEMA = {"force": bool, "limit": int, "method": str, "append": list}


def test_valid_options_pass():
    given = {"force": True, "limit": 3, "method": "txt", "append": ("quiet", "debug")}
    assert validate_options(given, SCHEMA) == given
    assert validate_options({}, SCHEMA) == {}


@pytest.mark.parametrize(("options", "fragment"), [
    ({"froce": True}, "unknown option 'froce' (known: append, force, limit, method)"),
    ({"force": 1}, "'force' must be a boolean"),
    ({"limit": True}, "'limit' must be an integer"),
    ({"limit": "3"}, "'limit' must be an integer"),
    ({"method": 3}, "'method' must be a string"),
    ({"append": "quiet"}, "'append' must be a list of strings"),
    ({"append": ["a", 1]}, "'append' must be a list of strings"),
])
def test_invalid_options_are_named(options, fragment):
    with pytest.raises(InvalidArgument) as info:
        validate_options(options, SCHEMA)
    assert fragment in str(info.value)
    with pytest.raises(InvalidArgument, match="known: none"):
        validate_options({"x": 1}, {})


def test_paths_must_be_absolute():
    assert absolute_path("/boot/x.efi") == "/boot/x.efi"
    with pytest.raises(InvalidArgument, match="the daemon has no cwd"):
        absolute_path("x.efi")
