"""The GLib 2.74 per-call leak in GDBus servers (ecosystem.md §2.2), neutralised.

benchmarks/soak.py measures it: without the fix the daemon grows ~2 kB per incoming call.
"""

from __future__ import annotations

import ctypes
import os

from gi.repository import Gio, GLib


def leak_shim_wanted() -> bool:
    """GLib 2.74 (Debian 12) hands each GDBusMethodInvocation to the Python closure with one
    reference too many; the invocation (message + arguments, ~2 kB) is never freed. Dropping
    that reference after replying fixes it. On a GLib that does not leak the same unref would
    free a live object, so it is applied only to the measured series; RELAUNCHD_GLIB_UNREF_SHIM
    =0/1 overrides (diagnosis), benchmarks/soak.py proves the effect."""
    forced = os.environ.get("RELAUNCHD_GLIB_UNREF_SHIM")
    if forced in ("0", "1"):
        return forced == "1"
    return (GLib.MAJOR_VERSION, GLib.MINOR_VERSION) == (2, 74)


class InvocationUnref:
    def __init__(self) -> None:
        self.enabled = leak_shim_wanted()
        if not self.enabled:
            return
        api = ctypes.pythonapi
        self._capsule_pointer = api.PyCapsule_GetPointer
        self._capsule_pointer.restype = ctypes.c_void_p
        self._capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        gobject = ctypes.CDLL("libgobject-2.0.so.0")
        self._unref = gobject.g_object_unref
        self._unref.argtypes = [ctypes.c_void_p]
        self._unref.restype = None

    def __call__(self, invocation: Gio.DBusMethodInvocation) -> None:
        # Called exactly once per invocation, after its reply was sent; the Python wrapper
        # still holds its own reference, so the object stays valid until that is dropped.
        if self.enabled:
            self._unref(self._capsule_pointer(invocation.__gpointer__, None))
