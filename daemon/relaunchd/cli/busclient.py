"""What the bus-backed `relaunchctl` commands share: the connection, waiting on
PropertiesChanged, exit codes and human formatting.

The D-Bus binding itself stays in `relaunchd.bus` (`bus.client.Client`); this module only
turns its answers into terminal output.

Exit codes of the bus commands (docs/dbus-api.md, "relaunchctl"):
  0  done (for `relaunch --wait`: the system is going down)
  1  a clean "no": not authorized, busy, nothing staged, verification/kexec failed,
     the relaunch failed, or relaunchd is not reachable (NoDaemon)
  2  invalid input (bad image, unknown option, bad argument)
  3  internal error in relaunchd or here
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from relaunchd.cli import EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_OK
from relaunchd.cli.output import human_size, print_json
from relaunchd.errors import Interrupted, NoDaemon, RelaunchError, error_named

INVALID = {"InvalidImage", "InvalidArgument", "InvalidConfig", "InvalidKernel", "InvalidTable"}
INTERNAL = {"Internal"}
POLL = 1.0   # belt and braces if a signal is missed; the client, not the daemon, wakes


def connect():
    from relaunchd.bus.client import Client

    return Client()


def daemon_available() -> bool:
    from relaunchd.bus.client import Client

    try:
        return Client(timeout_ms=5000).available()
    except RelaunchError:
        return False


def exit_code(exc: RelaunchError) -> int:
    if exc.name in INVALID:
        return EXIT_INVALID
    if exc.name in INTERNAL:
        return EXIT_INTERNAL
    return EXIT_FAILED


def handled(func: Callable[..., int]) -> Callable[..., int]:
    """Print named errors as `relaunchctl: Name: message` with the bus exit codes."""
    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except RelaunchError as exc:
            if getattr(args, "json", False):
                print_json({"error": {"name": exc.name, "message": str(exc)}})
            print(f"relaunchctl: {exc.name}: {exc}", file=sys.stderr)
            return exit_code(exc)
    return run


def interactive() -> bool:
    """Let polkit ask for a password only when a human is at the terminal."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def error_from(last_error: dict, default: str = "Failed") -> RelaunchError:
    name = str(last_error.get("name") or default)
    message = str(last_error.get("message") or name)
    cls = error_named(name)
    err = cls(message) if cls else RelaunchError(message)
    err.name = name
    return err


# --- human output -----------------------------------------------------------------------

def show_value(value: Any, indent: int = 2) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(show_value(item, indent + 2))
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict) and item:
                first, *rest = show_value(item, indent + 2)
                lines.append(f"{pad}- {first.strip()}")
                lines.extend(rest)
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [f"{pad}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value in ({}, []):
        return "-"
    return str(value)


def progress_line(progress: dict) -> str | None:
    done, total = progress.get("done"), progress.get("total")
    step = progress.get("step") or progress.get("phase") or ""
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        return f"{step} {100 * done // total:3d}% of {human_size(total)}".strip()
    if "percent" in progress:
        return f"{step} {progress['percent']}%".strip()
    return step or None


# --- stage over the bus -----------------------------------------------------------------

def stage(args) -> int:
    """`relaunchctl stage IMAGE` through relaunchd: Stage, then follow State/Progress."""
    return handled(_stage)(args)


def _stage(args) -> int:
    client = connect()
    options: dict[str, Any] = {}
    if args.profile is not None:
        options["profile"] = args.profile
    if args.method:
        options["method"] = args.method
    if args.cmdline is not None:
        options["cmdline"] = args.cmdline
    if args.append:
        options["append"] = list(args.append)
    if args.loader:
        options["loader"] = args.loader
    entry = "next-boot" if getattr(args, "next_boot", False) else getattr(args, "entry", None)
    if entry is not None:
        options["entry"] = entry
        if args.if_auto_stage:
            options["if_auto_stage"] = True
        path = ""
    else:
        # Absolute but not resolved: the daemon applies its own no-symlink rules.
        path = os.path.abspath(args.image)
    watch = client.watch()
    try:
        ident = client.call("Stage", path, options=options, interactive=interactive())
        if not ident:
            # if_auto_stage, and relaunchd's auto_stage is not next-boot.
            return _report_not_staged(args)
        if getattr(args, "no_wait", False):
            return _report_stage(args, path, ident, None)
        tty = sys.stderr.isatty() and not args.json
        last_line = ""
        props = client.properties()
        while True:
            state = props.get("State")
            staged = props.get("StagedImage") or {}
            last_error = props.get("LastError") or {}
            if state == "staged" and staged.get("id") == ident:
                if tty and last_line:
                    sys.stderr.write("\n")
                return _report_stage(args, path, ident, staged)
            # A replacement that failed leaves the image staged before it staged: State is
            # `staged` again, LastError names our id (and `kept`).
            if state == "failed" or (state == "staged" and last_error.get("id") == ident):
                raise error_from(last_error)
            if state in ("idle", "staged"):
                raise error_from({"name": "Cancelled", "message": "staging was cancelled"
                                  + (f"; {staged['id']} stays staged" if staged else "")})
            line = progress_line(props.get("Progress") or {})
            if tty and line and line != last_line:
                sys.stderr.write(f"\rstaging {args.image or entry}: {line}   ")
                sys.stderr.flush()
                last_line = line
            changes = watch.next(POLL)
            if watch.gone:
                raise NoDaemon("relaunchd left the bus while staging")
            if changes:
                for change in changes:
                    props.update(change)
            else:
                props = client.properties()
    finally:
        watch.close()


def _report_not_staged(args) -> int:
    reason = "relaunchd's configuration has auto_stage off: nothing staged"
    if args.json:
        print_json({"id": None, "staged": None, "auto_stage": False, "reason": reason})
    else:
        print(reason)
    return EXIT_OK


def _report_stage(args, path: str, ident: str, staged: dict | None) -> int:
    what = args.image or (staged or {}).get("entry", {}).get("id") or "boot entry"
    if args.json:
        print_json({"id": ident, "path": (staged or {}).get("path") or path or None,
                    "staged": staged})
    elif staged is None:
        print(f"{what}: staging started, id {ident}")
    else:
        print(f"{what}: staged, id {ident}")
        for line in show_value({k: v for k, v in staged.items() if k not in ("id", "path")}):
            print(line)
    return EXIT_OK


# Errors that mean "relaunchd is not (or no longer) serving": the name has no owner or
# the connection went away (NoDaemon), or the daemon has unregistered its object on the
# way out and GDBus answers for the missing object (UnknownMethod/UnknownObject).
DAEMON_GONE = frozenset({"NoDaemon", "UnknownMethod", "UnknownObject", "UnknownInterface"})
# How long relaunchd may stay away while systemd says the system is *not* stopping before
# `relaunch --wait` calls it a failure: a crashed daemon is restarted (Restart=) or bus
# activated by the next read, and then says what became of the relaunch.
GONE_GRACE = 30.0


@dataclass
class Termination:
    """Signals that asked this client to stop (SIGTERM from a stopping session scope or
    pod, SIGHUP from a dropped SSH connection), recorded instead of obeyed at once."""

    received: list[int] = field(default_factory=list)

    def handler(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def first(self) -> int | None:
        return self.received[0] if self.received else None

    @contextlib.contextmanager
    def installed(self, *signums: int) -> Iterator[Termination]:
        previous = {signum: signal.signal(signum, self.handler) for signum in signums}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def wait_relaunch(client, watch, ident: str, *,
                  terminated: Callable[[], int | None] = lambda: None,
                  system_state: Callable[[], str | None] | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  grace: float = GONE_GRACE) -> dict:
    """After relaunchd accepted Relaunch: block until the system is going down (return
    what was seen) or the relaunch failed (raise).

    Going down is relaunchd reaching `relaunching`, or — when relaunchd is unreachable
    or this process is told to stop, in whatever order the shutdown brings them —
    systemd saying it is stopping (or no longer answering at all). Every read of
    relaunchd is guarded alike, the first one too: on the way down it races the
    daemon's own stop."""
    if system_state is None:
        from relaunchd.platform.system_state import manager_state as system_state
    active = False           # seen quiescing: a later idle/staged means it was rolled back
    gone_since: float | None = None
    last_state: str | None = None
    while True:
        signum = terminated()
        if signum is not None:
            systemd = system_state()
            if _going_down(systemd):
                return _down(ident, last_state, f"signal {signum}", systemd)
            raise Interrupted(
                f"signal {signum} while waiting, and the system is not going down "
                f"(systemd: {systemd}); relaunch {ident} may still go on: "
                "see `relaunchctl status`")
        props = read_properties(client)
        if props is None:
            systemd = system_state()
            if _going_down(systemd):
                return _down(ident, last_state, "relaunchd left the bus", systemd)
            gone_since = clock() if gone_since is None else gone_since
            if clock() - gone_since >= grace:
                raise NoDaemon(
                    f"relaunchd left the bus during relaunch {ident} and the system is not "
                    f"going down (systemd: {systemd}, for {grace:.0f} s)")
        else:
            state = last_state = props.get("State")
            if state == "relaunching":
                return {"id": ident, "state": state, "bus": "connected", "seen": "relaunching"}
            if state == "failed":
                raise error_from(props.get("LastError") or {})
            if state == "quiescing":
                active = True
            elif state in ("idle", "staged") and (active or gone_since is not None):
                # Back without failing: the hand-off was refused or rolled back, or a
                # restarted daemon found the relaunch aborted.
                raise error_from(props.get("LastError") or {
                    "name": "RelaunchAborted", "message": f"relaunch ended in state {state}"})
        for change in watch.next(POLL):
            active = active or change.get("State") == "quiescing"


def read_properties(client) -> dict | None:
    """relaunchd's properties, or None when it is not serving (see DAEMON_GONE)."""
    try:
        return client.properties()
    except RelaunchError as exc:
        if exc.name in DAEMON_GONE:
            return None
        raise


def _going_down(systemd: str | None) -> bool:
    # None: systemd cannot be asked. With relaunchd gone or a stop signal received, that
    # is the bus (or PID 1's socket) going away under us: a shutdown.
    from relaunchd.platform.system_state import GOING_DOWN

    return systemd is None or systemd == GOING_DOWN


def _down(ident: str, state: str | None, seen: str, systemd: str | None) -> dict:
    return {"id": ident, "state": state, "bus": "lost", "seen": seen,
            "system": systemd or "unknown"}
