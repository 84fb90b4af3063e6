"""Engine values ⇄ D-Bus variants, and the checks on what callers send (docs/dbus-api.md).

Variant mapping (engine values are JSON-able): str → s, bool → b, int → x (t above 2^63, s
beyond 2^64), float → d, dict → a{sv}, list/tuple → av; a key whose value is None is left out
of its a{sv} and None list items are dropped; anything else is sent as its str().
"""

from __future__ import annotations

from typing import Any

from gi.repository import GLib

from relaunchd.errors import InvalidArgument


def to_variant(value: Any) -> GLib.Variant:
    if isinstance(value, GLib.Variant):
        return value
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return GLib.Variant("x", value)
        if 0 <= value < (1 << 64):
            return GLib.Variant("t", value)
        return GLib.Variant("s", str(value))
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", value)
    if isinstance(value, dict):
        return GLib.Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        return GLib.Variant("av", [to_variant(v) for v in value if v is not None])
    return GLib.Variant("s", str(value))


def to_vardict(value: dict | None) -> dict[str, GLib.Variant]:
    return {str(k): to_variant(v) for k, v in (value or {}).items() if v is not None}


def property_variant(signature: str, value: Any) -> GLib.Variant:
    if signature == "a{sv}":
        return GLib.Variant("a{sv}", to_vardict(value))
    return GLib.Variant(signature, "" if value is None else str(value))


def validate_options(options: dict, schema: dict[str, type]) -> dict[str, Any]:
    """Validate an a{sv} options dict (already unpacked). Unknown keys are errors, so
    a typo (`froce`) never silently changes what a privileged call does."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        kind = schema.get(key)
        if kind is None:
            known = ", ".join(sorted(schema)) or "none"
            raise InvalidArgument(f"unknown option {key!r} (known: {known})")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgument(f"option {key!r} must be an integer")
        if kind is bool and not isinstance(value, bool):
            raise InvalidArgument(f"option {key!r} must be a boolean")
        if kind is str and not isinstance(value, str):
            raise InvalidArgument(f"option {key!r} must be a string")
        if kind is list and (not isinstance(value, list | tuple)
                             or not all(isinstance(v, str) for v in value)):
            raise InvalidArgument(f"option {key!r} must be a list of strings")
        out[key] = value
    return out


def absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise InvalidArgument(f"{path!r}: the path must be absolute (the daemon has no cwd)")
    return path
