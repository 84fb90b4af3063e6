"""The service process's own logic (relaunchd.daemon), without a bus: its arguments,
`--check-config`, what happens without a system bus (the injected engine factory is never
called), the JournalReporter's structured records and sd_notify STATUS (on a datagram
socket of our own), and the watchdog interval. `main` over a private bus with an injected
engine is tests/integration/test_daemon.py; `build_engine` (the real host) is never called.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest

from relaunchd import __version__, daemon
from relaunchd.engine.journal_ids import MESSAGE_IDS

GOOD = "state_dir: /var/lib/relaunchd\nlaunch:\n  method: kexec\n"


@pytest.fixture(autouse=True)
def root_logger():
    """main() sets up the process's logging (root handlers and level): undone after each
    test, so the rest of the session logs as before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_bus(monkeypatch, tmp_path):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


def refuse_engine(config, notify):
    raise AssertionError("the engine must not be built")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        daemon.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"relaunchd {__version__}\n"


def test_check_config_of_a_good_file(tmp_path, capsys, no_bus):
    path = tmp_path / "relaunchd.yaml"
    path.write_text(GOOD)
    code = daemon.main(["--config", str(path), "--check-config"], make_engine=refuse_engine)
    assert code == daemon.EXIT_OK
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_check_config_names_key_and_line(tmp_path, capsys, no_bus):
    path = tmp_path / "relaunchd.yaml"
    path.write_text("state_dir: /tmp\nlaunch:\n  metod: kexec\n")
    code = daemon.main(["--config", str(path), "--check-config"], make_engine=refuse_engine)
    assert code == daemon.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("relaunchd: InvalidConfig: ") and "line 3" in err and "metod" in err


def test_an_unreadable_configuration_is_a_config_error(tmp_path, capsys, no_bus):
    code = daemon.main(["--config", str(tmp_path), "--check-config"],
                       make_engine=refuse_engine)           # a directory
    assert code == daemon.EXIT_CONFIG
    assert "InvalidConfig" in capsys.readouterr().err


def test_the_loader_is_injected_and_gets_the_path(tmp_path, no_bus):
    seen = []

    def load(path):
        seen.append(path)
        raise OSError(13, "Permission denied")

    code = daemon.main(["--config", "/etc/somewhere.yaml"], load=load,
                       make_engine=refuse_engine)
    assert seen == ["/etc/somewhere.yaml"] and code == daemon.EXIT_CONFIG


def test_without_a_system_bus_no_engine_is_built(tmp_path, capsys, no_bus):
    path = tmp_path / "relaunchd.yaml"
    path.write_text(GOOD)
    code = daemon.main(["--config", str(path)], make_engine=refuse_engine)
    assert code == daemon.EXIT_FAILED
    assert "relaunchd: no system bus" in capsys.readouterr().err


def test_unknown_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        daemon.main(["--frobnicate"])
    assert info.value.code == 2 and "--frobnicate" in capsys.readouterr().err


# ------------------------------------------------------------------ the journal reporter

class Engine:
    def __init__(self) -> None:
        self.state = "idle"
        self.staged_image: dict = {}
        self.last_error: dict = {}


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def records(caplog) -> list[tuple[int, str, dict]]:
    out = []
    for r in caplog.records:
        if r.name == "relaunchd":
            fields = {k: getattr(r, k) for k in ("MESSAGE_ID", "RELAUNCH_ID", "ERROR_NAME",
                                                 "RELAUNCHD_STATE") if hasattr(r, k)}
            out.append((r.levelno, r.getMessage(), fields))
    return out


def test_each_state_change_is_one_journal_record_and_a_status(caplog, notify_socket):
    caplog.set_level(logging.INFO, logger="relaunchd")
    engine = Engine()
    reporter = daemon.JournalReporter(engine)
    engine.state = "staging"
    reporter({"state", "progress"})
    reporter({"progress"})                            # not a state change
    reporter({"state"})                               # the same state again
    engine.state, engine.staged_image = "staged", {"id": "r-7", "path": "/boot/x.efi"}
    reporter({"state", "staged_image"})
    engine.state = "relaunching"
    reporter({"state"})
    engine.state, engine.last_error = "failed", {"name": "KexecFailed", "message": "EPERM"}
    reporter({"state", "last_error"})
    assert records(caplog) == [
        (logging.INFO, "staging an image",
         {"MESSAGE_ID": MESSAGE_IDS["staging"], "RELAUNCHD_STATE": "staging"}),
        (logging.INFO, "staged /boot/x.efi (id r-7)",
         {"MESSAGE_ID": MESSAGE_IDS["staged"], "RELAUNCH_ID": "r-7",
          "RELAUNCHD_STATE": "staged"}),
        (logging.WARNING, "relaunch started (relaunching)",
         {"MESSAGE_ID": MESSAGE_IDS["relaunch"], "RELAUNCH_ID": "r-7",
          "RELAUNCHD_STATE": "relaunching"}),
        (logging.ERROR, "KexecFailed: EPERM",
         {"MESSAGE_ID": MESSAGE_IDS["failure"], "RELAUNCH_ID": "r-7",
          "ERROR_NAME": "KexecFailed", "RELAUNCHD_STATE": "failed"}),
    ]
    statuses = [notify_socket.recv(4096).decode() for _ in range(4)]
    assert statuses == ["STATUS=staging", "STATUS=staged", "STATUS=relaunching",
                        "STATUS=failed"]


def test_idle_is_a_status_without_a_record(caplog, notify_socket):
    caplog.set_level(logging.INFO, logger="relaunchd")
    engine = Engine()
    engine.state = "idle"
    daemon.JournalReporter(engine)({"state"})
    assert records(caplog) == []
    assert notify_socket.recv(4096) == b"STATUS=idle"


def test_no_notify_socket_no_notification(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon._notify("READY=1")                         # nothing to talk to: silently nothing


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("200000", None, 0.1), ("200000", "self", 0.1), ("200000", "1", None),
    (None, None, None), ("soon", None, None),
])
def test_the_watchdog_pings_at_half_the_interval(monkeypatch, usec, pid, interval):
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert daemon._watchdog_interval() == interval
