"""`relaunchctl relaunch --wait` decides "the system is going down" (exit 0) or "the
relaunch failed" (exit 1) whatever order the shutdown brings: relaunchd's object
vanishing before its name (UnknownMethod), the daemon gone before the first read
(NoDaemon), the caller's own SIGTERM first. Driven with a scripted client and a
scripted systemd; the real signal path with a real SIGTERM to this process."""

from __future__ import annotations

import json
import os
import signal

import pytest

from relaunchd import bus
from relaunchd.cli import busclient, main
from relaunchd.cli import relaunch as relaunch_cmd
from relaunchd.errors import Interrupted, RelaunchAborted, RelaunchError

IDENT = "5b0c1f0e-relaunch"


def remote_error(name: str, message: str = "") -> RelaunchError:
    """What bus.client_error makes of a D-Bus error reply named `name`."""
    err = RelaunchError(message or name)
    err.name = name
    return err


class ScriptedClient:
    """Answers GetAll from a script: a dict is returned, an exception raised; the last
    entry repeats."""

    def __init__(self, *answers, relaunch: object = IDENT) -> None:
        self.answers = list(answers)
        self.reads = 0
        self.relaunch = relaunch
        self.calls: list[tuple[str, dict]] = []

    def properties(self) -> dict:
        self.reads += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    def call(self, method: str, *args, options=None, interactive=False):
        self.calls.append((method, options or {}))
        if isinstance(self.relaunch, BaseException):
            raise self.relaunch
        return self.relaunch

    def watch(self) -> ScriptedWatch:
        return ScriptedWatch()


class ScriptedWatch:
    def __init__(self, on_next=None) -> None:
        self.gone = False
        self.on_next = on_next
        self.closed = False

    def next(self, timeout: float) -> list[dict]:
        if self.on_next:
            self.on_next()
        return []

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0          # every look at the clock is one poll later
        return self.now


def systemd(*states):
    seq = list(states)
    return lambda: seq.pop(0) if len(seq) > 1 else seq[0]


def test_object_gone_before_the_first_read_while_stopping_is_going_down():
    # The race: relaunchd unregistered its object on SIGTERM, name still owned.
    client = ScriptedClient(remote_error(
        "UnknownMethod", 'Object does not exist at path "/org/relaunchd/Relaunch1"'))
    seen = busclient.wait_relaunch(client, ScriptedWatch(), IDENT,
                                   system_state=systemd("stopping"))
    assert seen == {"id": IDENT, "state": None, "bus": "lost",
                    "seen": "relaunchd left the bus", "system": "stopping"}
    assert client.reads == 1


def test_daemon_disconnected_without_replying_and_systemd_unreachable_is_going_down():
    client = ScriptedClient(bus.NoDaemon("relaunchd is not reachable: Remote peer "
                                         "disconnected from message bus without replying"))
    seen = busclient.wait_relaunch(client, ScriptedWatch(), IDENT, system_state=systemd(None))
    assert seen["bus"] == "lost" and seen["system"] == "unknown"


def test_relaunching_is_going_down_without_asking_systemd():
    asked = []
    client = ScriptedClient({"State": "relaunching"})
    seen = busclient.wait_relaunch(client, ScriptedWatch(), IDENT,
                                   system_state=lambda: asked.append(1) or "running")
    assert seen == {"id": IDENT, "state": "relaunching", "bus": "connected",
                    "seen": "relaunching"}
    assert asked == []


def test_a_stop_signal_during_a_shutdown_is_going_down():
    client = ScriptedClient({"State": "relaunching"})
    seen = busclient.wait_relaunch(client, ScriptedWatch(), IDENT, terminated=lambda: 15,
                                   system_state=systemd("stopping"))
    assert seen["seen"] == "signal 15" and seen["system"] == "stopping"
    assert client.reads == 0     # the signal is looked at before relaunchd is asked


def test_a_stop_signal_while_the_system_runs_is_interrupted_not_success():
    client = ScriptedClient({"State": "staged"})
    with pytest.raises(Interrupted, match=r"signal 1 .*not going down \(systemd: running\)"):
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT, terminated=lambda: 1,
                                system_state=systemd("running"))


def test_daemon_gone_while_the_system_runs_fails_after_the_grace_period():
    client = ScriptedClient(remote_error("UnknownObject"))
    clock = FakeClock()
    with pytest.raises(bus.NoDaemon, match="not going down"):
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT, system_state=systemd("running"),
                                clock=clock, grace=5)
    assert 4 <= client.reads <= 7


def test_a_restarted_daemon_that_found_the_relaunch_aborted_is_a_failure():
    aborted = {"State": "staged", "LastError": {"name": "RelaunchAborted",
                                                "message": f"relaunch {IDENT} never handed off"}}
    client = ScriptedClient(bus.NoDaemon("gone"), bus.NoDaemon("gone"), aborted)
    with pytest.raises(RelaunchAborted, match="never handed off"):
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT,
                                system_state=systemd("running"), clock=FakeClock())


def test_failed_state_raises_the_daemons_error():
    client = ScriptedClient({"State": "failed",
                             "LastError": {"name": "KexecFailed", "message": "no image"}})
    with pytest.raises(RelaunchError) as info:
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT, system_state=systemd("running"))
    assert info.value.name == "KexecFailed"


def test_rolled_back_quiesce_is_aborted():
    client = ScriptedClient({"State": "quiescing"}, {"State": "staged"})
    with pytest.raises(RelaunchError) as info:
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT, system_state=systemd("running"))
    assert info.value.name == "RelaunchAborted"


def test_other_errors_on_a_read_are_not_taken_for_a_shutdown():
    client = ScriptedClient(remote_error("AccessDenied", "no"))
    with pytest.raises(RelaunchError) as info:
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT,
                                system_state=systemd("stopping"))
    assert info.value.name == "AccessDenied"


# --- the command, with a real signal ----------------------------------------------------

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
