"""The GLib 2.74 per-call leak fix (relaunchd.bus.glib_leak): applied only on the GLib that
leaks (or when forced for diagnosis), and then dropping exactly one reference of the
object it is given — checked on a real GObject's reference count (PyGObject's
__grefcount__), after taking one extra reference through libgobject as the leak does."""

from __future__ import annotations

import ctypes

import pytest
from gi.repository import Gio, GLib

from relaunchd.bus import glib_leak


@pytest.mark.parametrize(("forced", "expected"), [("1", True), ("0", False)])
def test_the_environment_forces_it(monkeypatch, forced, expected):
    monkeypatch.setenv("RELAUNCHD_GLIB_UNREF_SHIM", forced)
    assert glib_leak.leak_shim_wanted() is expected


def test_otherwise_only_on_glib_2_74(monkeypatch):
    monkeypatch.delenv("RELAUNCHD_GLIB_UNREF_SHIM", raising=False)
    assert glib_leak.leak_shim_wanted() is ((GLib.MAJOR_VERSION, GLib.MINOR_VERSION) == (2, 74))
    monkeypatch.setenv("RELAUNCHD_GLIB_UNREF_SHIM", "maybe")       # not 0/1: the rule
    assert glib_leak.leak_shim_wanted() is ((GLib.MAJOR_VERSION, GLib.MINOR_VERSION) == (2, 74))


def test_enabled_it_drops_one_reference(monkeypatch):
    monkeypatch.setenv("RELAUNCHD_GLIB_UNREF_SHIM", "1")
    shim = glib_leak.InvocationUnref()
    obj = Gio.SimpleAction.new("x", None)
    gobject = ctypes.CDLL("libgobject-2.0.so.0")
    gobject.g_object_ref.argtypes = [ctypes.c_void_p]
    gobject.g_object_ref.restype = ctypes.c_void_p
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    before = obj.__grefcount__
    gobject.g_object_ref(get(obj.__gpointer__, None))           # the leaked reference
    assert obj.__grefcount__ == before + 1
    shim(obj)
    assert obj.__grefcount__ == before


def test_disabled_it_touches_nothing(monkeypatch):
    monkeypatch.setenv("RELAUNCHD_GLIB_UNREF_SHIM", "0")
    shim = glib_leak.InvocationUnref()
    obj = Gio.SimpleAction.new("x", None)
    before = obj.__grefcount__
    shim(obj)
    assert not shim.enabled and obj.__grefcount__ == before
