"""busclient.wait_relaunch: `relaunchctl relaunch --wait` decides "the system is going
down" (return) or "the relaunch failed" (raise) whatever order the shutdown brings:
relaunchd's object vanishing before its name (UnknownMethod), the daemon gone before the
first read (NoDaemon), the caller's own SIGTERM first; systemd's SystemState decides.
Driven with a scripted client and a scripted systemd (tests/support/scripted_client.py).
The command itself, with a real SIGTERM: tests/unit/cli/test_relaunch.py; against the
real daemon on a private bus: tests/integration/test_bus_service.py."""

from __future__ import annotations

import pytest

from relaunchd.cli import busclient
from relaunchd.errors import Interrupted, NoDaemon, RelaunchAborted, RelaunchError
from support.scripted_client import (
    IDENT,
    FakeClock,
    ScriptedClient,
    ScriptedWatch,
    remote_error,
    systemd,
)


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
    client = ScriptedClient(NoDaemon("relaunchd is not reachable: Remote peer "
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
    with pytest.raises(NoDaemon, match="not going down"):
        busclient.wait_relaunch(client, ScriptedWatch(), IDENT, system_state=systemd("running"),
                                clock=clock, grace=5)
    assert 4 <= client.reads <= 7


def test_a_restarted_daemon_that_found_the_relaunch_aborted_is_a_failure():
    aborted = {"State": "staged", "LastError": {"name": "RelaunchAborted",
                                                "message": f"relaunch {IDENT} never handed off"}}
    client = ScriptedClient(NoDaemon("gone"), NoDaemon("gone"), aborted)
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


def test_termination_records_signals_and_restores_the_handlers():
    import signal

    termination = busclient.Termination()
    before = signal.getsignal(signal.SIGHUP)
    with termination.installed(signal.SIGHUP):
        assert termination.first() is None
        signal.raise_signal(signal.SIGHUP)
    assert termination.first() == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) is before
