"""The relaunch (relaunchd.engine.relaunch) over the FakeMachine: readiness refusals, the
pending record, measurement into the TPM, logind inhibitors, the hand-off and its roll-back,
--immediate, and the rehearsal."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    Busy,
    KexecFailed,
    NotReady,
    NotStaged,
    QuiesceFailed,
    RelaunchError,
)
from relaunchd.platform.inhibitors import Inhibitor
from support.engine_env import (
    staged_engine,
)
from support.fakes import BOOT_ID, FakeMachine, make_report


def test_relaunch_refused_unless_staged(env):
    engine = env.engine()
    with pytest.raises(NotStaged):
        engine.relaunch()
    assert not env.pending_json.exists()
    assert ("handoff", "systemd") not in env.machine.calls


def test_relaunch_refused_when_not_loaded(env):
    engine, _ = staged_engine(env)
    env.machine.loaded = False
    with pytest.raises(NotReady, match="kexec_loaded"):
        engine.relaunch()
    assert not env.pending_json.exists()
    assert engine.state == "idle"              # the stale record was reconciled away
    assert not any(c[0] == "handoff" for c in env.machine.calls)


def test_relaunch_hands_off(env):
    engine, relaunch_id = staged_engine(env)
    env.notes.calls.clear()
    assert engine.relaunch(force=True) == relaunch_id
    assert env.machine.calls[-2:] == [("measure", 23), ("handoff", "systemd")]
    assert engine.state == "relaunching"
    pending = json.loads(env.pending_json.read_text())
    assert pending["id"] == relaunch_id and pending["handoff"] == "systemd"
    assert pending["boot_id"] == BOOT_ID and pending["force"] is True
    assert pending["kernel_sha256"] == "11" * 32 and pending["initrd_sha256"] == "22" * 32
    assert pending["method"] == "kexec" and pending["cmdline"] == "console=ttyS0"
    assert pending["predictions"]["pcr11"] == {"sha256": "33" * 32}
    assert pending["time"]
    assert "state" in env.notes.all() and "can_relaunch" in env.notes.all()
    assert engine.can_relaunch == "no"
    assert engine.staged_image["id"] == relaunch_id     # still loaded while going down
    assert engine.history()[0]["event"] == "relaunch-started"
    with pytest.raises(Busy):
        engine.stage(env.image)
    with pytest.raises(Busy):
        engine.cancel()


def test_relaunch_after_restart_uses_recorded_predictions(env):
    engine, relaunch_id = staged_engine(env)
    engine.close()
    again = env.engine()
    assert again.state == "staged"
    again.relaunch()
    pending = json.loads(env.pending_json.read_text())
    assert pending["id"] == relaunch_id
    assert pending["predictions"]["pcr11"] == {"sha256": "33" * 32}


@pytest.mark.parametrize("failure", [RelaunchError("systemctl failed: no bus"),
                                     OSError(2, "No such file or directory")])
def test_handoff_failure_rolls_back(env, failure):
    engine, _ = staged_engine(env)
    env.machine.fail_handoff = failure
    with pytest.raises(RelaunchError):
        engine.relaunch()
    assert not env.pending_json.exists()
    assert engine.state == "staged" and engine.can_relaunch == "yes"
    assert engine.last_error["name"] == "Failed"
    assert env.machine.loaded is True and env.staged_json.exists()
    assert engine.history()[0]["event"] == "relaunch-failed"
    env.machine.fail_handoff = None
    engine.relaunch()                                # nothing half-done: it can try again
    assert engine.state == "relaunching"


def test_immediate_quiesces_then_jumps(env):
    engine, relaunch_id = staged_engine(env)
    assert engine.relaunch(immediate=True) == relaunch_id
    assert env.machine.names()[-3:] == ["measure", "quiesce", "handoff"]
    assert env.machine.calls[-1] == ("handoff", "immediate")
    assert "quiescing" in env.notes.states
    pending = json.loads(env.pending_json.read_text())
    assert pending["handoff"] == "immediate" and pending["measurement"]["measured"] is True
    # the shutdown hook's marker is for systemd hand-offs only
    assert not (Path(env.config.runtime_dir) / state.HANDOFF).exists()


def test_immediate_kexec_failure_rolls_the_quiesce_back(env):
    engine, _ = staged_engine(env)
    env.machine.fail_handoff = KexecFailed("reboot(LINUX_REBOOT_CMD_KEXEC) failed")
    with pytest.raises(KexecFailed):
        engine.relaunch(immediate=True)
    assert env.machine.names()[-2:] == ["handoff", "rollback"]
    assert engine.state == "staged" and not env.pending_json.exists()
    assert engine.last_error["name"] == "KexecFailed"


def test_failing_quiesce_stops_the_relaunch(env):
    engine, _ = staged_engine(env)
    env.machine.fail_quiesce = QuiesceFailed("offline CPU 1 failed: EBUSY; rolled back")
    with pytest.raises(QuiesceFailed):
        engine.relaunch(immediate=True)
    assert "handoff" not in env.machine.names()
    assert "rollback" not in env.machine.names()      # execute rolled back itself
    assert engine.state == "staged" and engine.last_error["name"] == "QuiesceFailed"
    assert not env.pending_json.exists()


def test_rehearse(env):
    engine, _ = staged_engine(env)
    env.notes.states.clear()
    report = engine.rehearse()
    assert report["ok"] is True
    assert report["executed"] == [{"action": "cpu-offline", "target": "1", "previous": "1"}]
    assert report["rollback"]["restored"] == ["CPU 1 online"]
    assert env.notes.states == ["quiescing", "staged"]
    assert "handoff" not in env.machine.names() and not env.pending_json.exists()
    assert engine.history()[0]["event"] == "rehearsed"
    env.machine.fail_quiesce = QuiesceFailed("unbind 0000:00:03.0 failed; rolled back")
    with pytest.raises(QuiesceFailed):
        engine.rehearse()
    assert engine.state == "staged" and engine.last_error["name"] == "QuiesceFailed"
    assert engine.history()[0]["event"] == "rehearsal-failed"


def test_rehearse_needs_a_plan_for_the_staged_image(env):
    engine, _ = staged_engine(env)
    (Path(env.config.runtime_dir) / state.QUIESCE_PLAN).unlink()
    with pytest.raises(NotReady, match="no quiesce plan"):
        engine.rehearse()
    with pytest.raises(NotStaged):
        env.engine().close() or Engine(env.config, FakeMachine()).rehearse()


def test_measurement_extends_the_staged_digests(env):
    engine, relaunch_id = staged_engine(env)
    engine.relaunch()
    assert [label for label, _ in env.machine.measured_items] == ["kernel", "initrd",
                                                                   "cmdline"]
    assert env.machine.measured_items[0][1] == {"sha256": bytes.fromhex("01" * 32)}
    measurement = json.loads(env.pending_json.read_text())["measurement"]
    assert measurement == {"measured": True, "pcr": 23, "banks": ["sha256"],
                           "log": os.path.join(env.config.state_dir, "measurements.log"),
                           "reset_count": 7, "items": ["kernel", "initrd", "cmdline"]}
    marker = json.loads((Path(env.config.runtime_dir) / state.HANDOFF).read_text())
    assert marker == {"id": relaunch_id}


def test_no_tpm_relaunches_unmeasured_unless_required(env, tmp_path):
    from relaunchd.engine.config import MeasurementConfig
    from relaunchd.errors import NoTpm

    engine, _ = staged_engine(env)
    env.machine.tpm = False
    engine.relaunch()
    measurement = json.loads(env.pending_json.read_text())["measurement"]
    assert measurement["measured"] is False and "no TPM" in measurement["reason"]

    strict = dataclasses.replace(env.config, state_dir=str(tmp_path / "state2"),
                                 runtime_dir=str(tmp_path / "run2"),
                                 measurement=MeasurementConfig(require_tpm=True))
    env.config = strict
    env.machine.loaded = False
    engine, _ = staged_engine(env)
    with pytest.raises(NoTpm, match="require_tpm"):
        engine.relaunch()
    assert engine.state == "staged" and engine.last_error["name"] == "NoTpm"
    assert "handoff" not in env.machine.names()[-2:]
    assert not env.pending_json.exists()


def test_a_refusing_tpm_always_stops_the_relaunch(env):
    from relaunchd.errors import TpmFailed

    engine, _ = staged_engine(env)
    env.machine.fail_measure = TpmFailed("TPM refused the extend: TPM_RC_LOCALITY")
    with pytest.raises(TpmFailed):
        engine.relaunch(force=True)
    assert engine.state == "staged" and engine.last_error["name"] == "TpmFailed"
    assert env.machine.names()[-1] == "measure" and not env.pending_json.exists()


def test_inhibitors_block_unless_forced(env):
    from relaunchd.errors import Inhibited

    engine, _ = staged_engine(env)
    env.machine.inhibitors = [Inhibitor("shutdown", "apt", "upgrading", "block", 0, 4242),
                              Inhibitor("shutdown", "upower", "lid", "delay", 0, 77),
                              Inhibitor("sleep", "backup", "copying", "block", 0, 78)]
    with pytest.raises(Inhibited, match="apt .upgrading, pid 4242"):
        engine.relaunch()
    assert engine.state == "staged" and "measure" not in env.machine.names()
    assert not env.pending_json.exists()
    engine.relaunch(force=True)
    assert engine.history()[0]["detail"]["overridden"] == [
        "inhibitors: apt (upgrading, pid 4242)"]


def test_method_no_longer_ready_refuses(env):
    engine, _ = staged_engine(env)
    env.machine.report = make_report(ready=set())
    with pytest.raises(NotReady, match="no longer ready"):
        engine.relaunch()
    assert engine.state == "staged" and "measure" not in env.machine.names()
