"""`org.relaunchd.Relaunch1` on the system bus: a thin skin over the engine.

The service translates arguments, authorizes (`polkit`), runs the engine call off the main
loop, and translates results and errors back. The engine speaks its own vocabulary; the
mapping of its change names to D-Bus properties lives here (`PROPERTY_OF`).

Why Gio's `register_object` instead of pydbus's `publish`: pydbus replies synchronously from
the handler (no deferred replies, pydbus#58) and names errors after the Python class.
Registering the closure ourselves — the same call pydbus makes — lets every engine call and
every polkit check run off the main loop and reply later, map errors by name, and neutralise
the GLib 2.74 per-call leak in one place (`glib_leak`).

Any local user may call the read-only methods, so none of them may delay a privileged
call (issue #14): GDBus's message filter admits a call only while its caller, and all
callers of the open methods together, have few enough outstanding (`admission`; `Busy`
at once otherwise, before the call queues for the main loop); calls polkit authorized to
change something run in their own lane of workers (`call_lanes`), the others share a
bounded lane; identical `Check`s share one probe and its report for
`CHECK_REUSE_SECONDS` (`shared_results`); a caller may have only a few authorizations
pending with polkit at a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from functools import partial
from typing import Any

from gi.repository import Gio, GLib

from relaunchd.bus import call_lanes, polkit
from relaunchd.bus.admission import DEFAULT_LIMITS, Admission, AdmissionLimits, DelayedReplies
from relaunchd.bus.error_names import dbus_error
from relaunchd.bus.glib_leak import InvocationUnref
from relaunchd.bus.names import (
    ACTION_PREFIX,
    BUS_NAME,
    DBUS_ERROR,
    ERROR_PREFIX,
    INTERFACE,
    OBJECT_PATH,
    PROPERTIES_IFACE,
    introspection_xml,
)
from relaunchd.bus.shared_results import SharedResults
from relaunchd.bus.variants import absolute_path, property_variant, to_vardict, validate_options
from relaunchd.errors import Busy, InvalidArgument, RelaunchError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.1                          # at most 10 Progress signals a second
CHECK_REUSE_SECONDS = 2.0       # a Check report is shared by the calls in this window
CHECK_MAX_WAITERS = 512         # Checks waiting for one running probe
AUTHORIZING_PER_CALLER = 4      # polkit checks pending for one caller
# Methods that change something: they run in the control lane, never behind others' calls.
CONTROL_METHODS = frozenset({"Stage", "Relaunch", "Rehearse", "Cancel"})
BUSY_REPLY_DELAY = 2.0          # a call refused at admission is answered Busy this late


# The engine's property names → the D-Bus properties they are published as.
PROPERTY_OF = {"state": "State", "progress": "Progress", "staged_image": "StagedImage",
               "capabilities": "Capabilities", "can_relaunch": "CanRelaunch",
               "last_relaunch": "LastRelaunch", "last_error": "LastError",
               "version": "Version"}
ENGINE_NAME_OF = {dbus: engine for engine, dbus in PROPERTY_OF.items()}

# method → (polkit action or None, option schema)
_METHODS: dict[str, tuple[str | None, dict[str, type]]] = {
    "Check": (None, {"method": str}),
    "ListImages": (None, {}),
    "Inspect": ("inspect", {"profile": int}),
    "Stage": ("stage", {"profile": int, "method": str, "cmdline": str, "append": list,
                        "loader": str, "entry": str, "if_auto_stage": bool}),
    "Relaunch": ("relaunch", {"force": bool, "immediate": bool, "fallback": str}),
    "Rehearse": ("relaunch", {}),
    "Cancel": ("cancel", {"if_entry": str, "if_kernel": str}),
    "GetHistory": (None, {"limit": int}),
}


class Service:
    """`/org/relaunchd/Relaunch1` over an engine with the `engine.core.Engine` surface.

    Threads: the GLib main loop reads every call and answers properties, cached Checks and
    authorization failures; engine calls run in the two lanes' workers (engine methods may
    take ~0.5 s or block on the engine's lock), which send their replies themselves; the
    engine's `notify` may come from any thread and is marshalled with `GLib.idle_add`.
    """

    def __init__(self, engine: Any, connection: Gio.DBusConnection, *,
                 control: call_lanes.LaneLimits = call_lanes.CONTROL,
                 query: call_lanes.LaneLimits = call_lanes.QUERY,
                 admission: AdmissionLimits = DEFAULT_LIMITS) -> None:
        self.engine = engine
        self._con = connection
        node = Gio.DBusNodeInfo.new_for_xml(introspection_xml())
        self._info = node.lookup_interface(INTERFACE)
        self._props = {p.name: p.signature for p in self._info.properties}
        self._outsig = {m.name: "(" + "".join(a.signature for a in m.out_args) + ")"
                        for m in self._info.methods}
        self._insig = {m.name: "".join(a.signature for a in m.in_args)
                       for m in self._info.methods}
        self._admission = Admission(CONTROL_METHODS, admission)
        self._busy_replies = DelayedReplies(
            lambda reply: self._con.send_message(reply, Gio.DBusSendMessageFlags.NONE),
            BUSY_REPLY_DELAY)
        self._filter_id: int | None = None
        self._control = call_lanes.Lane("control", control, self._caller_present)
        self._query = call_lanes.Lane("query", query, self._caller_present)
        self._checks: SharedResults[GLib.Variant, Gio.DBusMethodInvocation] = SharedResults(
            CHECK_REUSE_SECONDS, CHECK_MAX_WAITERS)
        self._authorizing: Counter[str] = Counter()      # main loop only
        self._unref = InvocationUnref()
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
        self._filter_id = self._con.add_filter(self._filter)

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
        if self._filter_id is not None:
            self._con.remove_filter(self._filter_id)
            self._filter_id = None
        self._busy_replies.close()
        if self._registration is not None:
            self._con.unregister_object(self._registration)
            self._registration = None
        self._control.shutdown()
        self._query.shutdown()

    def on_change(self, hook: Callable[[set[str]], None]) -> None:
        """Also run `hook(engine names)` on the main loop after each PropertiesChanged."""
        self._hooks.append(hook)

    @property
    def leak_shim(self) -> bool:
        return self._unref.enabled

    # property changes (any thread → main loop)

    def notify(self, engine_names: Iterable[str]) -> None:
        """The engine's change callback (any thread): the engine's names of what changed."""
        with self._lock:
            names = {PROPERTY_OF[n] for n in engine_names if n in PROPERTY_OF}
            if not names:
                return
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
        engine_names = {ENGINE_NAME_OF[n] for n in names if n in ENGINE_NAME_OF}
        for hook in self._hooks:
            try:
                hook(engine_names)
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
        return property_variant(self._props[name], getattr(self.engine, ENGINE_NAME_OF[name]))

    # admission (GDBus's worker thread, every message in and out)

    def _filter(self, con: Gio.DBusConnection, message: Gio.DBusMessage,
                incoming: bool) -> Gio.DBusMessage | None:
        if not incoming or message.get_message_type() != Gio.DBusMessageType.METHOD_CALL \
                or message.get_path() != OBJECT_PATH or not self._reaches_us(message):
            return message
        try:
            self._admission.admit(message.get_sender(), message.get_serial(),
                                  message.get_member())
        except Busy as exc:
            self._busy_replies.add(Gio.DBusMessage.new_method_error_literal(
                message, ERROR_PREFIX + exc.name, str(exc)))
            return None
        return message

    def _reaches_us(self, message: Gio.DBusMessage) -> bool:
        """Whether GDBus will hand this call to `_on_call` (and so it gets our reply): a
        Manager method with its signature, or Properties.Get/GetAll of our interface.
        Anything else GDBus answers itself, and it must not be counted."""
        iface, member = message.get_interface(), message.get_member()
        signature = message.get_signature()
        if iface == INTERFACE:
            return self._insig.get(member) == signature
        if iface != PROPERTIES_IFACE or member not in ("Get", "GetAll"):
            return False
        if signature != ("ss" if member == "Get" else "s"):
            return False
        args = message.get_body().unpack()
        return args[0] == INTERFACE and (member == "GetAll" or args[1] in self._props)

    # incoming calls (main loop)

    def _on_call(self, _con, sender: str, _path: str, iface: str, method: str,
                 params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        arrived = time.monotonic()
        try:
            if iface == PROPERTIES_IFACE:
                self._properties_call(method, params.unpack(), invocation)
                return
            action, schema = _METHODS[method]
            args = list(params.unpack())
            args[-1] = validate_options(args[-1], schema)       # every method ends in a{sv} options
            if method == "Check":
                self._check(invocation, sender, arrived, args[-1])
                return
            if action is None:
                self._run(invocation, sender, arrived, method, args)
                return
            details = {"path": args[0]} if method in ("Stage", "Inspect") else {}
            if method == "Stage" and "entry" in args[-1]:
                details["entry"] = args[-1]["entry"]
            self._authorize(invocation, sender, ACTION_PREFIX + action, details,
                            lambda authorized: self._run(invocation, sender, authorized,
                                                         method, args), arrived)
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

    def _run(self, invocation: Gio.DBusMethodInvocation, sender: str, arrived: float,
             method: str, args: list) -> None:
        lane = self._control if method in CONTROL_METHODS else self._query
        with self._lock:
            self._inflight += 1

        def done(f: Future) -> None:
            # Replied from the worker: a GDBus invocation may be answered from any thread,
            # and a reply queued behind the main loop's work would wait for it again.
            self._finish(invocation, method, f)

        try:
            lane.submit(sender, arrived, partial(getattr(self, "_do_" + method), *args), done)
        except (Busy, RuntimeError) as exc:   # full, or shut down: we are stopping
            with self._lock:
                self._inflight -= 1
            self._reply_error(invocation, exc)

    def _check(self, invocation: Gio.DBusMethodInvocation, sender: str, arrived: float,
               options: dict) -> None:
        """Check: a report at most CHECK_REUSE_SECONDS old, one probe for all who ask."""
        key = options.get("method")
        cached = self._checks.fresh(key)
        if cached is not None:
            self._reply(invocation, cached)
            return
        running = self._checks.join(key, invocation)     # Busy if too many wait
        with self._lock:
            self._inflight += 1
        if running:
            return

        def done(f: Future) -> None:
            GLib.idle_add(self._checked, key, f)

        try:
            self._query.submit(sender, arrived, partial(self._do_Check, options), done)
        except (Busy, RuntimeError) as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            self._checked(key, failed)

    def _checked(self, key: str | None, future: Future) -> bool:
        try:
            value: GLib.Variant | None = GLib.Variant(self._outsig["Check"], (future.result(),))
            error = None
        except Exception as exc:
            value, error = None, exc
        waiters = self._checks.finish(key, value)
        with self._lock:
            self._inflight -= len(waiters)
        for invocation in waiters:
            if error is None:
                self._reply(invocation, value)
            else:
                self._reply_error(invocation, error)
        return False

    def _caller_present(self, name: str) -> bool:
        """Whether `name` is still on the bus (any thread; GDBus connections are)."""
        try:
            reply = self._con.call_sync(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "NameHasOwner", GLib.Variant("(s)", (name,)), GLib.VariantType("(b)"),
                Gio.DBusCallFlags.NONE, 5000, None)
        except GLib.Error:
            return True       # cannot tell: run it, as before
        return bool(reply.unpack()[0])

    def _finish(self, invocation: Gio.DBusMethodInvocation, method: str, future: Future) -> bool:
        """Reply with a lane's result (a worker thread)."""
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
        self._admission.release(invocation.get_sender(), invocation.get_message().get_serial())
        self._unref(invocation)

    # authorization

    def _authorize(self, invocation: Gio.DBusMethodInvocation, sender: str, action: str,
                   details: dict[str, str], then: Callable[[float], None],
                   arrived: float) -> None:
        """Run `then(arrived)` if polkit allows the caller `action`, else reply the denial.
        A call that let polkit ask a human counts its wait from the answer, not from its
        arrival (its client waits that long on purpose)."""
        interactive = bool(invocation.get_message().get_flags()
                           & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION)
        if self._authorizing[sender] >= AUTHORIZING_PER_CALLER:
            raise Busy(f"{self._authorizing[sender]} of your calls are waiting for polkit; "
                       "wait for their replies")
        self._authorizing[sender] += 1

        def decided() -> None:
            self._authorizing[sender] -= 1
            if self._authorizing[sender] <= 0:
                del self._authorizing[sender]

        def allowed() -> None:
            decided()
            then(time.monotonic() if interactive else arrived)

        def denied(error: str, message: str) -> None:
            decided()
            self._reply(invocation, None, error, message)

        polkit.authorize(self._con, sender, action, details, interactive=interactive,
                         allowed=allowed, denied=denied)

    # the methods (worker threads): translate and call the engine

    def _do_Check(self, options: dict) -> dict:
        return to_vardict(self.engine.check(method=options.get("method")))

    def _do_ListImages(self, _options: dict) -> list:
        return [to_vardict(i) for i in self.engine.list_images()]

    def _do_Inspect(self, path: str, options: dict) -> dict:
        return to_vardict(self.engine.inspect(absolute_path(path), profile=options.get("profile")))

    def _do_Stage(self, path: str, options: dict) -> str:
        # A boot entry (option `entry`) is staged with an empty path; only the options
        # given are passed on, so an engine without boot entries keeps working.
        by_entry = {k: options[k] for k in ("entry", "if_auto_stage") if k in options}
        return self.engine.stage(
            "" if "entry" in options and not path else absolute_path(path),
            profile=options.get("profile"), method=options.get("method"),
            cmdline=options.get("cmdline"), append=tuple(options.get("append", ())),
            loader=options.get("loader"), **by_entry)

    def _do_Relaunch(self, options: dict) -> str:
        return self.engine.relaunch(force=options.get("force", False),
                                    immediate=options.get("immediate", False),
                                    fallback=options.get("fallback"))

    def _do_Rehearse(self, _options: dict) -> dict:
        return to_vardict(self.engine.rehearse())

    def _do_Cancel(self, options: dict) -> None:
        self.engine.cancel(**{k: options[k] for k in ("if_entry", "if_kernel") if k in options})

    def _do_GetHistory(self, options: dict) -> list:
        limit = options.get("limit", 50)
        if limit < 0:
            raise InvalidArgument("option 'limit' must not be negative")
        return [to_vardict(e) for e in self.engine.history(limit=limit)]
