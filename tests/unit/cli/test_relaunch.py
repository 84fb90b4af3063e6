"""`relaunchctl relaunch`: --wait exits 0 with its line when a real SIGTERM arrives during a
shutdown, 1 with the daemon's reason when refused; --json says how the shutdown was seen;
without --wait a vanished daemon is not an error; --force, --immediate and --fallback
become the Relaunch call's options. A scripted client (tests/support/scripted_client.py)
stands in for the bus; the real daemon: tests/integration/test_bus_service.py."""

from __future__ import annotations

import json
import os
import signal

import pytest

from relaunchd.cli import busclient, main
from relaunchd.cli import relaunch as relaunch_cmd
from support.scripted_client import IDENT, ScriptedClient, ScriptedWatch, remote_error, systemd


@pytest.fixture
def fake_daemon(monkeypatch):
    def install(client, state="stopping"):
        monkeypatch.setattr(busclient, "connect", lambda: client)
        monkeypatch.setattr(relaunch_cmd, "connect", lambda: client)
        monkeypatch.setattr("relaunchd.platform.system_state.manager_state",
                            systemd(state))
        return client
    return install


def test_sigterm_after_the_call_exits_0_with_the_going_down_line(fake_daemon, capsys):
    client = fake_daemon(ScriptedClient({"State": "staged"}))
    # The shutdown stops the caller's scope: a real SIGTERM, delivered while waiting.
    client.watch = lambda: ScriptedWatch(on_next=lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["relaunch", "--wait"]) == 0
    out = capsys.readouterr()
    assert out.out == f"relaunch {IDENT}: the system is going down\n", out
    assert signal.getsignal(signal.SIGTERM) is before     # handler restored


def test_json_output_says_how_the_shutdown_was_seen(fake_daemon, capsys):
    fake_daemon(ScriptedClient(remote_error("UnknownMethod")))
    assert main(["relaunch", "--wait", "--json", "--force"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"id": IDENT, "state": None, "bus": "lost",
                   "seen": "relaunchd left the bus", "system": "stopping"}


def test_refused_relaunch_exits_1_and_says_why(fake_daemon, capsys):
    refused = remote_error("NotStaged", "nothing is staged")
    fake_daemon(ScriptedClient({"State": "idle"}, relaunch=refused))
    assert main(["relaunch", "--wait"]) == 1
    assert "relaunchctl: NotStaged: nothing is staged" in capsys.readouterr().err


def test_without_wait_a_vanished_daemon_is_not_an_error(fake_daemon, capsys):
    fake_daemon(ScriptedClient(remote_error("UnknownMethod")))
    assert main(["relaunch"]) == 0
    assert capsys.readouterr().out == f"relaunch {IDENT} started (gone)\n"


@pytest.mark.parametrize("argv, options", [
    ([], {}),
    (["--force"], {"force": True}),
    (["--immediate"], {"immediate": True}),
    (["--fallback", "reboot"], {"fallback": "reboot"}),
    (["--wait", "--fallback", "none", "--force"], {"fallback": "none", "force": True}),
])
def test_options_of_the_relaunch_call(fake_daemon, capsys, argv, options):
    client = fake_daemon(ScriptedClient({"State": "relaunching"}))
    assert main(["relaunch", *argv]) == 0
    assert client.calls == [("Relaunch", options)]


def test_rehearse_calls_rehearse(fake_daemon, capsys):
    client = fake_daemon(ScriptedClient({"State": "staged"}))
    client.relaunch = {"ok": True, "executed": [], "rollback": {}, "mismatches": []}
    assert main(["relaunch", "--rehearse"]) == 0
    assert client.calls == [("Rehearse", {})]
    assert "rehearsal: OK" in capsys.readouterr().out
