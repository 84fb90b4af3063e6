"""`relaunchd`: the service process — config, engine, D-Bus service, main loop.

systemd integration (`Type=notify`): READY=1 once the bus name is owned, STATUS= on
every state change, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM. The
process sleeps in the GLib main loop: no timer exists unless the watchdog asks for one.

Journal messages carry the MESSAGE_IDs of `engine.journal_ids` (docs/dbus-api.md lists
them): staging started, image staged, relaunch started, operation failed, and — logged by
the engine in the boot a relaunch led to — relaunch verified / NOT verified. The
Prometheus textfile (`prometheus.TextfileExporter`) follows the engine's changes too.

`main` and `serve` take the engine's constructor as an argument: the bus tests run this
same service over a fake engine or machine by passing theirs
(tests/support/daemon_under_test.py); nothing here imports a module named at run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from relaunchd import __version__
from relaunchd.engine.journal_ids import MESSAGE_IDS
from relaunchd.errors import RelaunchError
from relaunchd.prometheus import TextfileExporter

DEFAULT_CONFIG = "/etc/relaunchd/relaunchd.yaml"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
STOP_DRAIN_SECONDS = 5.0


log = logging.getLogger("relaunchd")


def _notify(message: str) -> None:
    """sd_notify when systemd is listening; silently nothing otherwise."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon as sd_daemon
    except ImportError:
        return
    sd_daemon.notify(message)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    # Under systemd stderr is the journal stream already, but the native protocol keeps
    # the structured fields (MESSAGE_ID, RELAUNCH_ID, ERROR_NAME).
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="relaunchd")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("relaunchd: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


EngineFactory = Callable[[Any, Callable[[set[str]], None]], Any]


def build_engine(config: Any, notify: Callable[[set[str]], None]) -> Any:
    """The engine over the real host, logind's inhibitors asked over the system bus."""
    from relaunchd.bus.logind import LogindInhibitors
    from relaunchd.engine.core import Engine
    from relaunchd.engine.host_machine import HostMachine

    machine = HostMachine.for_config(config, inhibitor_source=LogindInhibitors())
    return Engine(config, machine, notify=notify)


def load_config(path: str) -> Any:
    from relaunchd.engine.config_file import load_config as load

    return load(path)


def _check_references(config: Any) -> None:
    """`--check-config`: the trust files the configuration names exist and parse (the
    test engines' configurations carry no trust section)."""
    from relaunchd.engine.config import Config
    from relaunchd.engine.config_check import check_references

    if isinstance(config, Config):
        check_references(config)


class JournalReporter:
    """Turns engine state changes into structured journal records and sd_notify STATUS."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.state = None

    def __call__(self, names: set[str]) -> None:
        if "state" not in names:
            return
        state = self.engine.state
        if state == self.state:
            return
        self.state = state
        staged = self.engine.staged_image or {}
        fields = {"RELAUNCHD_STATE": state}
        if staged.get("id") and state != "staging":   # staging: the image staged before
            fields["RELAUNCH_ID"] = str(staged["id"])
        if state == "staging":
            self._log(logging.INFO, "staging", "staging an image", fields)
        elif state == "staged":
            self._log(logging.INFO, "staged",
                      f"staged {staged.get('path', 'an image')} (id {staged.get('id', '?')})",
                      fields)
        elif state in ("quiescing", "relaunching"):
            self._log(logging.WARNING, "relaunch", f"relaunch started ({state})", fields)
        elif state == "failed":
            err = self.engine.last_error or {}
            name = str(err.get("name", "Failed"))
            fields["ERROR_NAME"] = name
            self._log(logging.ERROR, "failure", f"{name}: {err.get('message', '')}", fields)
        _notify(f"STATUS={state}")

    def _log(self, level: int, what: str, text: str, fields: dict[str, str]) -> None:
        log.log(level, text, extra={"MESSAGE_ID": MESSAGE_IDS[what], **fields})


def serve(config: Any, make_engine: EngineFactory = build_engine) -> int:
    from relaunchd.bus import mainloop
    from relaunchd.bus.names import BUS_NAME
    from relaunchd.bus.service import Service

    try:
        connection = mainloop.system_bus()
    except mainloop.FAILURES as exc:
        print(f"relaunchd: no system bus: {exc}", file=sys.stderr)
        return EXIT_FAILED
    holder: dict[str, Any] = {}

    def notify(names: set[str]) -> None:   # any engine thread
        exporter = holder.get("exporter")
        if exporter is not None:
            exporter(names)
        service = holder.get("service")
        if service is not None:
            service.notify(names)          # marshalled to the main loop there

    engine = make_engine(config, notify)
    metrics = getattr(getattr(config, "metrics", None), "textfile_path", None)
    holder["exporter"] = exporter = TextfileExporter(engine, metrics)
    exporter.export()
    service = Service(engine, connection)
    holder["service"] = service
    journal = JournalReporter(engine)
    service.on_change(journal)
    loop = mainloop.main_loop()
    try:
        try:
            service.register()
            service.request_name()
        except mainloop.FAILURES as exc:   # name taken, or the bus policy says no
            print(f"relaunchd: cannot serve {BUS_NAME}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if not service.leak_shim:
            log.info("GLib per-call unref shim not applied (GLib is not 2.74)")

        def stop() -> None:
            log.info("stopping")
            _notify("STOPPING=1")
            # A Relaunch that just queued kexec.target is what stops us: let its reply
            # (the relaunch id) reach the caller first.
            service.drain(STOP_DRAIN_SECONDS, loop.quit)

        mainloop.on_unix_signal(signal.SIGTERM, stop)
        mainloop.on_unix_signal(signal.SIGINT, stop)
        watchdog = _watchdog_interval()
        if watchdog:
            mainloop.every(watchdog, lambda: _notify("WATCHDOG=1"))
        journal({"state"})
        _notify(f"READY=1\nSTATUS={engine.state}")
        log.info("relaunchd %s on the bus as %s, state %s", __version__, BUS_NAME,
                 engine.state)
        loop.run()
    finally:
        service.close()
        engine.close()
    return EXIT_OK


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        return None


def main(argv: list[str] | None = None, *, make_engine: EngineFactory = build_engine,
         load: Callable[[str], Any] = load_config) -> int:
    parser = argparse.ArgumentParser(prog="relaunchd",
                                     description="The relaunchd service (D-Bus: "
                                                 "org.relaunchd.Relaunch1).")
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"relaunchd {__version__}")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        config = load(args.config)
        if args.check_config:
            _check_references(config)
    except RelaunchError as exc:
        print(f"relaunchd: {exc.name}: {exc}", file=sys.stderr)
        _notify(f"STATUS={exc.name}: {exc}")
        return EXIT_CONFIG
    except OSError as exc:
        print(f"relaunchd: InvalidConfig: {args.config}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: OK")
        return EXIT_OK
    try:
        return serve(config, make_engine)
    except RelaunchError as exc:
        log.error("%s: %s", exc.name, exc, extra={"MESSAGE_ID": MESSAGE_IDS["failure"]})
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
