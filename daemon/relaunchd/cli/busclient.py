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

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from relaunchd.cli import EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_OK
from relaunchd.cli.output import human_size, print_json
from relaunchd.errors import NoDaemon, RelaunchError, error_named

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


def wait_relaunch(client, watch, ident: str) -> dict:
    """Block until relaunchd is relaunching or has left the bus (the system is going down),
    or the relaunch failed (raises). Returns what was seen."""
    props = client.properties()
    active = False
    while True:
        state = props.get("State")
        if state == "relaunching":
            return {"id": ident, "state": state, "bus": "connected"}
        if state == "failed":
            raise error_from(props.get("LastError") or {})
        if state == "quiescing":
            active = True
        elif active and state in ("idle", "staged"):
            # Back without failing: the hand-off was refused or rolled back.
            raise error_from(props.get("LastError") or {
                "name": "RelaunchAborted", "message": f"relaunch ended in state {state}"})
        changes = watch.next(POLL)
        if watch.gone:
            return {"id": ident, "state": props.get("State"), "bus": "lost"}
        if changes:
            for change in changes:
                props.update(change)
                active = active or change.get("State") == "quiescing"
        else:
            try:
                props = client.properties()
            except RelaunchError:
                return {"id": ident, "state": props.get("State"), "bus": "lost"}
