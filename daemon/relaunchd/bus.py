"""The D-Bus adapter: `org.relaunchd.Relaunch1` on the system bus, and its client.

The only module that imports gi/pydbus (DESIGN "Layers"). The service is a thin
skin over `engine.Engine`: translate arguments, authorize, run, translate
results and errors. The client half (`Client`) is what `relaunchctl` uses, so
the CLI never touches the binding either.

Why Gio's `register_object` instead of pydbus's `publish`: pydbus replies
synchronously from the handler (no deferred replies, pydbus#58) and names errors
after the Python class. Registering the closure ourselves — the same call pydbus
makes — lets every engine call and every polkit check run off the main loop and
reply later, map errors by name, and neutralise the GLib 2.74 per-call leak in one
place. pydbus still provides the connection (it honours DBUS_SYSTEM_BUS_ADDRESS).

Variant mapping (engine values are JSON-able): str → s, bool → b, int → x (t
above 2^63, s beyond 2^64), float → d, dict → a{sv}, list/tuple → av; a key
whose value is None is left out of its a{sv} and None list items are dropped;
anything else is sent as its str(). docs/dbus-api.md documents the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Any

import pydbus
from gi.repository import Gio, GLib

from relaunchd import errors
from relaunchd.errors import InvalidArgument, RelaunchError

log = logging.getLogger(__name__)

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
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
# polkit is "absent" (uid 0 may proceed) only for these; any other failure denies.
POLKIT_ABSENT = {DBUS_ERROR + "ServiceUnknown", DBUS_ERROR + "NameHasNoOwner"}
POLKIT_INTERACTIVE_TIMEOUT_MS = 5 * 60 * 1000   # a human may be typing a password
PROGRESS_INTERVAL = 0.1                          # at most 10 Progress signals a second


def introspection_xml() -> str:
    """The shipped XML — the one definition of the interface."""
    return (resources.files(__package__) / "dbus" / INTROSPECTION_XML).read_text()


# --- values -----------------------------------------------------------------------------

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


def _property_variant(signature: str, value: Any) -> GLib.Variant:
    if signature == "a{sv}":
        return GLib.Variant("a{sv}", to_vardict(value))
    return GLib.Variant(signature, "" if value is None else str(value))


def _options(options: dict, schema: dict[str, type]) -> dict[str, Any]:
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


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise InvalidArgument(f"{path!r}: the path must be absolute (the daemon has no cwd)")
    return path


def dbus_error(exc: BaseException) -> tuple[str, str]:
    """The D-Bus error name and message for an exception raised while serving a call."""
    if isinstance(exc, RelaunchError):
        return ERROR_PREFIX + exc.name, str(exc)
    return ERROR_PREFIX + "Internal", f"internal error: {type(exc).__name__}: {exc}"


# --- the GLib 2.74 per-call leak (ecosystem.md §2.2) ----------------------------------

def _leak_shim_wanted() -> bool:
    """GLib 2.74 (Debian 12) hands each GDBusMethodInvocation to the Python closure with one
    reference too many; the invocation (message + arguments, ~2 kB) is never freed. Dropping
    that reference after replying fixes it. On a GLib that does not leak the same unref would
    free a live object, so it is applied only to the measured series; RELAUNCHD_GLIB_UNREF_SHIM
    =0/1 overrides (diagnosis), benchmarks/soak.py proves the effect."""
    forced = os.environ.get("RELAUNCHD_GLIB_UNREF_SHIM")
    if forced in ("0", "1"):
        return forced == "1"
    return (GLib.MAJOR_VERSION, GLib.MINOR_VERSION) == (2, 74)


class _Unref:
    def __init__(self) -> None:
        self.enabled = _leak_shim_wanted()
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


# --- the service ------------------------------------------------------------------------

# method → (polkit action or None, option schema)
_METHODS: dict[str, tuple[str | None, dict[str, type]]] = {
    "Check": (None, {"method": str}),
    "ListImages": (None, {}),
    "Inspect": ("inspect", {"profile": int}),
    "Stage": ("stage", {"profile": int, "method": str, "cmdline": str, "append": list,
                        "loader": str}),
    "Relaunch": ("relaunch", {"force": bool, "immediate": bool}),
    "Rehearse": ("relaunch", {}),
    "Cancel": ("cancel", {}),
    "GetHistory": (None, {"limit": int}),
}


class Service:
    """`/org/relaunchd/Relaunch1` over an engine with the `engine.Engine` surface.

    Threads: the GLib main loop owns the connection and every reply; engine calls run
    in `_pool` (engine methods may take ~0.5 s or block on the engine's lock); the
    engine's `notify` may come from any thread and is marshalled with `GLib.idle_add`.
    """

    def __init__(self, engine: Any, connection: Gio.DBusConnection, *,
                 workers: int = 4) -> None:
        self.engine = engine
        self._con = connection
        node = Gio.DBusNodeInfo.new_for_xml(introspection_xml())
        self._info = node.lookup_interface(INTERFACE)
        self._props = {p.name: p.signature for p in self._info.properties}
        self._outsig = {m.name: "(" + "".join(a.signature for a in m.out_args) + ")"
                        for m in self._info.methods}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bus-call")
        self._unref = _Unref()
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._inflight = 0                    # method calls whose reply is not sent yet
        self._scheduled = False
        self._last_progress = 0.0
        self._hooks: list[Callable[[set[str]], None]] = []
        self._registration: int | None = None
        # Built variants per property, dropped by notify(): GetAll from a polling monitor
        # costs a dict copy instead of re-reading and re-encoding the engine's state.
        self._cache: dict[str, GLib.Variant] = {}

    # lifecycle

    def register(self) -> None:
        self._registration = self._con.register_object(
            OBJECT_PATH, self._info, self._on_call, None, None)

    def request_name(self) -> None:
        """Own the bus name or fail: no queueing, no replacement (pydbus's publish() would
        allow replacement, ecosystem.md §2.1)."""
        reply = self._con.call_sync(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "RequestName", GLib.Variant("(su)", (BUS_NAME, 0x4)),  # DO_NOT_QUEUE
            GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None)
        if reply.unpack()[0] != 1:  # 1 = primary owner
            raise RuntimeError(f"{BUS_NAME} is already owned on this bus")

    def close(self) -> None:
        if self._registration is not None:
            self._con.unregister_object(self._registration)
            self._registration = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def on_change(self, hook: Callable[[set[str]], None]) -> None:
        """Also run `hook(names)` on the main loop after each PropertiesChanged."""
        self._hooks.append(hook)

    @property
    def leak_shim(self) -> bool:
        return self._unref.enabled

    # property changes (any thread → main loop)

    def notify(self, names: Iterable[str]) -> None:
        with self._lock:
            names = set(names)
            for name in names:
                self._cache.pop(name, None)
            self._pending.update(names)
            if self._scheduled:
                return
            self._scheduled = True
        GLib.idle_add(self._flush)

    def _flush(self) -> bool:
        with self._lock:
            names = self._pending
            now = time.monotonic()
            wait = self._last_progress + PROGRESS_INTERVAL - now
            if names == {"Progress"} and wait > 0:
                # Only progress moved: batch it, so a fast copy cannot flood the bus.
                GLib.timeout_add(max(1, int(wait * 1000)), self._flush)
                return False
            self._pending = set()
            self._scheduled = False
            if "Progress" in names:
                self._last_progress = now
        changed = {}
        for name in sorted(names):
            if name in self._props:
                try:
                    changed[name] = self._get(name)
                except Exception:
                    log.exception("reading property %s", name)
        if changed:
            self._con.emit_signal(
                None, OBJECT_PATH, PROPERTIES_IFACE, "PropertiesChanged",
                GLib.Variant("(sa{sv}as)", (INTERFACE, changed, [])))
        for hook in self._hooks:
            try:
                hook(names)
            except Exception:
                log.exception("property change hook")
        return False

    def _get(self, name: str) -> GLib.Variant:
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        value = self._read(name)
        with self._lock:
            # A notify() that raced with the read wins: cache only if still absent and
            # no change is pending for this name.
            if name not in self._pending:
                self._cache.setdefault(name, value)
        return value

    def _read(self, name: str) -> GLib.Variant:
        attr = {"State": "state", "Progress": "progress", "StagedImage": "staged_image",
                "Capabilities": "capabilities", "CanRelaunch": "can_relaunch",
                "LastRelaunch": "last_relaunch", "LastError": "last_error",
                "Version": "version"}[name]
        return _property_variant(self._props[name], getattr(self.engine, attr))

    # incoming calls (main loop)

    def _on_call(self, _con, sender: str, _path: str, iface: str, method: str,
                 params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        try:
            if iface == PROPERTIES_IFACE:
                self._properties_call(method, params.unpack(), invocation)
                return
            action, schema = _METHODS[method]
            args = list(params.unpack())
            args[-1] = _options(args[-1], schema)       # every method ends in a{sv} options
            if action is None:
                self._run(invocation, method, args)
                return
            details = {"path": args[0]} if method in ("Stage", "Inspect") else {}
            self._authorize(invocation, sender, ACTION_PREFIX + action, details,
                            lambda: self._run(invocation, method, args))
        except Exception as exc:
            self._reply_error(invocation, exc)

    def _properties_call(self, method: str, args: tuple,
                         invocation: Gio.DBusMethodInvocation) -> None:
        if method == "Get":
            iface, name = args
            if iface != INTERFACE or name not in self._props:
                self._reply(invocation, None, DBUS_ERROR + "UnknownProperty",
                            f"no property {iface}.{name}")
            else:
                self._reply(invocation, GLib.Variant("(v)", (self._get(name),)))
        elif method == "GetAll":
            values = {n: self._get(n) for n in self._props} if args[0] in (INTERFACE, "") else {}
            self._reply(invocation, GLib.Variant("(a{sv})", (values,)))
        else:  # Set: every property is read-only; privileged changes are methods
            self._reply(invocation, None, DBUS_ERROR + "PropertyReadOnly",
                        "relaunchd properties are read-only")

    def drain(self, timeout: float, then: Callable[[], None]) -> None:
        """Call `then` (on the main loop) once every running method call has replied, or
        after `timeout` s. On SIGTERM: the Relaunch that asked systemd for kexec.target
        is still finishing when systemd stops us, and its caller deserves the reply."""
        deadline = time.monotonic() + timeout

        def check() -> bool:
            with self._lock:
                busy = self._inflight
            if busy and time.monotonic() < deadline:
                return True          # GLib: call again
            if busy:
                log.warning("stopping with %d method calls unanswered", busy)
            with contextlib.suppress(GLib.Error):
                self._con.flush_sync(None)
            then()
            return False

        if check():
            GLib.timeout_add(50, check)

    def _run(self, invocation: Gio.DBusMethodInvocation, method: str, args: list) -> None:
        with self._lock:
            self._inflight += 1
        try:
            future = self._pool.submit(getattr(self, "_do_" + method), *args)
        except RuntimeError as exc:       # the pool is shut down: we are stopping
            with self._lock:
                self._inflight -= 1
            self._reply_error(invocation, exc)
            return

        def done(f: Future) -> None:
            GLib.idle_add(self._finish, invocation, method, f)

        future.add_done_callback(done)

    def _finish(self, invocation: Gio.DBusMethodInvocation, method: str, future: Future) -> bool:
        with self._lock:
            self._inflight -= 1
        try:
            result = future.result()
            sig = self._outsig[method]
            self._reply(invocation, GLib.Variant(sig, (result,)) if sig != "()" else None)
        except Exception as exc:
            self._reply_error(invocation, exc)
        return False

    def _reply_error(self, invocation: Gio.DBusMethodInvocation, exc: BaseException) -> None:
        name, message = dbus_error(exc)
        if isinstance(exc, RelaunchError):
            log.info("%s.%s: %s: %s", INTERFACE, invocation.get_method_name(), exc.name, exc)
        else:
            log.error("%s.%s failed", INTERFACE, invocation.get_method_name(), exc_info=exc)
        self._reply(invocation, None, name, message)

    def _reply(self, invocation: Gio.DBusMethodInvocation, value: GLib.Variant | None,
               error: str | None = None, message: str = "") -> None:
        if error:
            invocation.return_dbus_error(error, message)
        else:
            invocation.return_value(value)
        self._unref(invocation)

    # authorization

    def _authorize(self, invocation: Gio.DBusMethodInvocation, sender: str, action: str,
                   details: dict[str, str], then: Callable[[], None]) -> None:
        """polkit CheckAuthorization for the caller's unique name (a system-bus-name subject:
        race-free, unlike a PID), asynchronously so a slow or interactive check never blocks
        the main loop. Interaction only when the caller's message allows it (as systemd)."""
        interactive = bool(invocation.get_message().get_flags()
                           & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION)
        subject = ("system-bus-name", {"name": GLib.Variant("s", sender)})
        params = GLib.Variant("((sa{sv})sa{ss}us)",
                              (subject, action, details, 1 if interactive else 0, ""))

        def checked(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                allowed, challenge, _ = con.call_finish(result).unpack()[0]
            except GLib.Error as exc:
                remote = Gio.DBusError.get_remote_error(exc)
                if remote in POLKIT_ABSENT:
                    self._root_only(invocation, sender, action, then)
                else:
                    log.warning("polkit check for %s failed: %s", action, exc.message)
                    self._reply(invocation, None, ACCESS_DENIED,
                                f"{action}: authorization check failed")
                return
            if allowed:
                then()
            elif challenge and not interactive:
                self._reply(invocation, None, INTERACTIVE_REQUIRED,
                            f"{action} needs authentication; call with interactive "
                            "authorization allowed")
            else:
                self._reply(invocation, None, ACCESS_DENIED, f"{action}: not authorized")

        self._con.call(POLKIT_NAME, POLKIT_PATH, POLKIT_IFACE, "CheckAuthorization", params,
                       GLib.VariantType("((bba{ss}))"), Gio.DBusCallFlags.NONE,
                       POLKIT_INTERACTIVE_TIMEOUT_MS if interactive else -1, None, checked)

    def _root_only(self, invocation: Gio.DBusMethodInvocation, sender: str, action: str,
                   then: Callable[[], None]) -> None:
        """No polkitd on this machine: root may act, nobody else can be authorized."""
        def got_uid(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                uid = con.call_finish(result).unpack()[0]
            except GLib.Error as exc:
                self._reply(invocation, None, ACCESS_DENIED, f"{action}: {exc.message}")
                return
            if uid == 0:
                then()
            else:
                self._reply(invocation, None, ACCESS_DENIED,
                            f"{action}: not authorized (polkit is not available)")

        self._con.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)),
                       GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None, got_uid)

    # the methods (worker threads): translate and call the engine

    def _do_Check(self, options: dict) -> dict:
        return to_vardict(self.engine.check(method=options.get("method")))

    def _do_ListImages(self, _options: dict) -> list:
        return [to_vardict(i) for i in self.engine.list_images()]

    def _do_Inspect(self, path: str, options: dict) -> dict:
        return to_vardict(self.engine.inspect(_absolute(path), profile=options.get("profile")))

    def _do_Stage(self, path: str, options: dict) -> str:
        return self.engine.stage(
            _absolute(path), profile=options.get("profile"), method=options.get("method"),
            cmdline=options.get("cmdline"), append=tuple(options.get("append", ())),
            loader=options.get("loader"))

    def _do_Relaunch(self, options: dict) -> str:
        return self.engine.relaunch(force=options.get("force", False),
                                    immediate=options.get("immediate", False))

    def _do_Rehearse(self, _options: dict) -> dict:
        return to_vardict(self.engine.rehearse())

    def _do_Cancel(self, _options: dict) -> None:
        self.engine.cancel()

    def _do_GetHistory(self, options: dict) -> list:
        limit = options.get("limit", 50)
        if limit < 0:
            raise InvalidArgument("option 'limit' must not be negative")
        return [to_vardict(e) for e in self.engine.history(limit=limit)]


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


# --- the client -------------------------------------------------------------------------

class NoDaemon(RelaunchError):
    """relaunchd is not on the bus (not running, not activatable, or no bus at all)."""

    name = "NoDaemon"


class AccessDenied(RelaunchError):
    name = "AccessDenied"


def _error_classes() -> dict[str, type[RelaunchError]]:
    found: dict[str, type[RelaunchError]] = {}
    todo: list[type[RelaunchError]] = [RelaunchError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.name, cls)
        todo.extend(cls.__subclasses__())
    found.update({"NoDaemon": NoDaemon, "AccessDenied": AccessDenied})
    return found


_UNREACHABLE = {"ServiceUnknown", "NameHasNoOwner", "NoReply", "Disconnected", "NoServer",
                "SpawnFailed", "SpawnChildExited", "SpawnExecFailed", "FileNotFound",
                "TimedOut", "Timeout"}


def client_error(exc: GLib.Error) -> RelaunchError:
    """A GLib.Error from a call to relaunchd as the matching `RelaunchError`."""
    # GDBus keeps the remote name in the message ("GDBus.Error:<name>: <text>"); a local
    # failure (closed connection, timeout) has no such prefix.
    match = re.match(r"GDBus\.Error:([^\s:]+): ?(.*)", exc.message, re.S)
    remote, message = match.groups() if match else ("", exc.message)
    if remote.startswith(ERROR_PREFIX):
        name = remote[len(ERROR_PREFIX):]
    elif remote in (ACCESS_DENIED, INTERACTIVE_REQUIRED):
        name = "AccessDenied"
    elif not remote or remote.removeprefix(DBUS_ERROR) in _UNREACHABLE:
        return NoDaemon(f"relaunchd is not reachable: {message}")
    else:
        name = remote.rsplit(".", 1)[-1]
    cls = _error_classes().get(name)
    if cls is not None:
        return cls(message)
    err = RelaunchError(message)
    err.name = name
    return err


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
