"""The relaunch (relaunchd.engine.relaunch) over the FakeMachine: readiness refusals, the
pending record, measurement into the TPM, logind inhibitors, the hand-off and its roll-back,
--immediate, and the rehearsal."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from relaunchd.engine import relaunch as relaunch_rules
from relaunchd.engine import state
from relaunchd.engine.config import Config, LaunchConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    Busy,
    Inhibited,
    InvalidArgument,
    KexecFailed,
    NoTpm,
    NotReady,
    NotStaged,
    QuiesceFailed,
    RelaunchAborted,
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


# ------------------------------------------------------------------ the rules, one by one

def staged_record(**kw) -> state.StagedRecord:
    base = {"id": "r-1", "path": "/boot/x.efi", "method": "kexec", "loader": "file",
            "kernel_sha256": "11" * 32, "initrd_sha256": "22" * 32, "cmdline": "quiet",
            "staged_at": state.now(),
            "digests": {"kernel": {"sha256": "01" * 32, "sha1": "0a" * 20},
                        "initrd": {"sha256": "02" * 32, "sha1": "0b" * 20},
                        "cmdline": {"sha256": "03" * 32, "sha1": "0c" * 20}}}
    return state.StagedRecord(**{**base, **kw})


def caps(method: str, ready: bool, *reasons: str) -> dict:
    return {method: {"ready": ready, "reasons": list(reasons)}}


@pytest.mark.parametrize(("require_tpm", "refused"), [(False, False), (True, True)])
def test_a_missing_tpm_only_means_unmeasured_unless_required(env, require_tpm, refused):
    config = dataclasses.replace(env.config, measurement=dataclasses.replace(
        env.config.measurement, require_tpm=require_tpm))
    check = lambda: relaunch_rules.readiness(  # noqa: E731
        config, env.machine, staged_record(), caps("kexec", False, "tpm-missing"), force=False)
    if refused:
        with pytest.raises(NotReady, match="tpm-missing"):
            check()
    else:
        assert check() == []


def test_force_overrides_readiness_and_inhibitors_and_says_so(env):
    env.machine.inhibitors = [Inhibitor("shutdown", "apt", "upgrading", "block", 0, 7)]
    record = staged_record(method="txt")
    not_ready = caps("txt", False, "txt-error", "tpm-crb")
    with pytest.raises(NotReady, match="txt-error, tpm-crb"):
        relaunch_rules.readiness(env.config, env.machine, record, not_ready, force=False)
    with pytest.raises(Inhibited, match=r"apt \(upgrading, pid 7\)"):
        relaunch_rules.readiness(env.config, env.machine, record, caps("txt", True),
                                 force=False)
    assert relaunch_rules.readiness(env.config, env.machine, record, not_ready,
                                    force=True) == [
        "method txt not ready: txt-error, tpm-crb", "inhibitors: apt (upgrading, pid 7)"]


def test_inhibitors_are_not_asked_when_the_configuration_says_so(env):
    env.machine.inhibitors = [Inhibitor("shutdown", "apt", "upgrading", "block", 0, 7)]
    config = dataclasses.replace(env.config, quiesce=dataclasses.replace(
        env.config.quiesce, respect_inhibitors=False))
    assert relaunch_rules.readiness(config, env.machine, staged_record(), caps("kexec", True),
                                    force=False) == []


def test_measure_extends_kernel_initrd_and_cmdline_in_that_order(env):
    config = dataclasses.replace(env.config, measurement=dataclasses.replace(
        env.config.measurement, banks=("sha256", "sha1")))
    result = relaunch_rules.measure(config, env.machine, staged_record())
    assert result == {"pcr": 23, "banks": ["sha256", "sha1"],
                      "log": os.path.join(config.state_dir, "measurements.log"),
                      "measured": True, "reset_count": 7,
                      "items": ["kernel", "initrd", "cmdline"]}
    assert env.machine.measured_items == [
        ("kernel", {"sha256": bytes.fromhex("01" * 32), "sha1": bytes.fromhex("0a" * 20)}),
        ("initrd", {"sha256": bytes.fromhex("02" * 32), "sha1": bytes.fromhex("0b" * 20)}),
        ("cmdline", {"sha256": bytes.fromhex("03" * 32), "sha1": bytes.fromhex("0c" * 20)})]


def test_measure_without_an_initrd(env):
    record = staged_record(digests={"kernel": {"sha256": "01" * 32},
                                    "cmdline": {"sha256": "03" * 32}})
    assert relaunch_rules.measure(env.config, env.machine, record)["items"] == [
        "kernel", "cmdline"]


@pytest.mark.parametrize(("digests", "fragment"), [
    ({"kernel": {"sha1": "0a" * 20}}, "no sha256 digest"),      # banks changed since staging
    ({}, "no digests"),
])
def test_measure_refuses_what_it_cannot_extend(env, digests, fragment):
    with pytest.raises(NotReady, match=fragment):
        relaunch_rules.measure(env.config, env.machine, staged_record(digests=digests))
    assert "measure" not in env.machine.names()


def test_measure_without_a_tpm(env):
    env.machine.tpm = False
    result = relaunch_rules.measure(env.config, env.machine, staged_record())
    assert result["measured"] is False and "no TPM" in result["reason"]
    strict = dataclasses.replace(env.config, measurement=dataclasses.replace(
        env.config.measurement, require_tpm=True))
    with pytest.raises(NoTpm, match="require_tpm"):
        relaunch_rules.measure(strict, env.machine, staged_record())


def test_the_json_of_a_plan_and_a_rehearsal(env):
    plan = env.machine.quiesce_plan(None)
    assert relaunch_rules.plan_summary(plan) == {
        "offline_cpus": [1], "devices": [], "holders": [], "kept_cpus": [], "notes": [],
        "uninspected": 0}
    report = relaunch_rules.rehearsal_json(env.machine.rehearse(plan, "/nonexistent"))
    assert report["ok"] is True and report["executed"] == [
        {"action": "cpu-offline", "target": "1", "previous": "1"}]
    json.dumps(report)


# ------------------------------------------------------------------ --fallback reboot
# When the relaunch cannot happen: an ordinary firmware reboot, recorded, and reported by
# the next boot as a fallback — never as verified.

class HandoffRefusedOnce(FakeMachine):
    """systemd refuses kexec.target; reboot.target is queued."""

    def handoff(self, kind: str) -> None:
        self.calls.append(("handoff", kind))
        if kind == "systemd":
            raise RelaunchError("systemctl start … kexec.target failed: Transaction is "
                                "destructive.")


def pending(config: Config) -> dict:
    return json.loads((Path(config.state_dir) / state.PENDING).read_text())


def staged_on(env, machine: FakeMachine) -> Engine:
    env.machine = machine
    engine, _ = staged_engine(env)
    return engine


def test_nothing_staged_falls_back_to_a_recorded_reboot(env):
    config = env.config
    machine = FakeMachine()
    engine = Engine(config, machine)
    relaunch_id = engine.relaunch(fallback="reboot")
    assert machine.calls[-1] == ("handoff", "reboot")
    assert ("handoff", "systemd") not in machine.calls
    record = pending(config)
    assert record["id"] == relaunch_id and record["method"] == "firmware-reboot"
    assert record["handoff"] == "reboot" and record["fallback_reason"].startswith("NotStaged")
    event = engine.history()[0]
    assert event["event"] == "relaunch-fallback" and event["detail"]["error"] == "NotStaged"
    assert engine.state == "relaunching" and engine.last_error["name"] == "NotStaged"


def test_without_fallback_nothing_changes(env):
    config = env.config
    machine = FakeMachine()
    engine = Engine(config, machine)
    with pytest.raises(NotStaged):
        engine.relaunch()
    with pytest.raises(NotStaged):
        engine.relaunch(fallback="none")
    assert not any(c[0] == "handoff" for c in machine.calls)
    assert not (Path(config.state_dir) / state.PENDING).exists()


def test_the_configured_default_applies(env):
    config = env.config
    config = dataclasses.replace(config, launch=LaunchConfig(fallback="reboot"))
    machine = FakeMachine()
    Engine(config, machine).relaunch()
    assert machine.calls[-1] == ("handoff", "reboot")
    machine2 = FakeMachine()
    with pytest.raises(NotStaged):          # the call's option wins over the default
        Engine(config, machine2).relaunch(fallback="none")


def test_a_method_no_longer_ready_unloads_then_reboots(env):
    config, image = env.config, env.image
    machine = FakeMachine()
    engine = staged_on(env, machine)
    machine.report = make_report(ready=set())
    relaunch_id = engine.relaunch(fallback="reboot")
    names = machine.names()
    assert names[-2:] == ["unload", "handoff"] and machine.calls[-1] == ("handoff", "reboot")
    assert "measure" not in names            # nothing was extended for a firmware reboot
    record = pending(config)
    assert record["id"] == relaunch_id and record["path"] == image
    assert record["fallback_reason"].startswith("NotReady")
    assert machine.loaded is False


def test_a_refused_handoff_falls_back(env):
    config = env.config
    machine = HandoffRefusedOnce()
    engine = staged_on(env, machine)
    engine.relaunch(fallback="reboot")
    assert [c for c in machine.calls if c[0] == "handoff"] == [("handoff", "systemd"),
                                                             ("handoff", "reboot")]
    assert pending(config)["fallback_reason"].startswith("Failed: systemctl")
    events = [e["event"] for e in engine.history()]
    assert events[:2] == ["relaunch-fallback", "relaunch-failed"]


def test_inhibitors_are_never_rebooted_past(env):
    machine = FakeMachine()
    engine = staged_on(env, machine)
    machine.inhibitors = [Inhibitor("shutdown", "backup", "copying", "block", 0, 42)]
    with pytest.raises(Inhibited):
        engine.relaunch(fallback="reboot")
    assert not any(c[0] == "handoff" for c in machine.calls)
    assert engine.state == "staged" and machine.loaded is True


def test_a_failed_fallback_reboot_is_reported_and_leaves_no_pending_record(env):
    config = env.config
    machine = FakeMachine()
    machine.fail_handoff = RelaunchError("systemctl start … reboot.target failed: no")
    engine = Engine(config, machine)
    with pytest.raises(RelaunchError, match="the fallback reboot failed"):
        engine.relaunch(fallback="reboot")
    assert not (Path(config.state_dir) / state.PENDING).exists()
    assert engine.state == "idle"
    assert "fallback reboot failed" in engine.last_error["message"]
    assert engine.history()[0]["event"] == "relaunch-failed"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fallback": "poweroff"}, "unknown fallback"),
    ({"fallback": "reboot", "immediate": True}, "immediate"),
])
def test_bad_fallback_requests(env, kwargs, match):
    config = env.config
    with pytest.raises(InvalidArgument, match=match):
        Engine(config, FakeMachine()).relaunch(**kwargs)


def test_the_next_boot_reports_a_fallback_never_verified(env):
    config = env.config
    machine = FakeMachine()
    engine = staged_on(env, machine)
    machine.report = make_report(ready=set())
    relaunch_id = engine.relaunch(fallback="reboot")
    engine.close()
    # The firmware reboot: new boot id, /run emptied, nothing loaded.
    machine.boot = "new-boot"
    machine.facts = dataclasses.replace(machine.facts, boot_id="new-boot",
                                        cmdline="root=/dev/vda quiet\n")
    for path in Path(config.runtime_dir).iterdir():
        path.unlink()
    machine.loaded = False
    last = Engine(config, machine).last_relaunch
    assert last["id"] == relaunch_id and last["method"] == "firmware-reboot"
    assert last["verified"] is False and last["handoff"] == "reboot"
    assert last["fallback"]["reason"].startswith("NotReady")
    assert last["mismatches"][0].startswith("no relaunch: relaunchd fell back to a firmware "
                                            "reboot")
    assert last["measured"] is False and last["downtime_ms"] is not None


def test_a_fallback_that_never_rebooted_is_an_aborted_relaunch(env):
    config = env.config
    machine = FakeMachine()
    engine = Engine(config, machine)
    engine.relaunch(fallback="reboot")
    engine.close()
    again = Engine(config, machine)           # same boot id: the reboot did not happen
    assert again.last_error["name"] == RelaunchAborted.name
    assert ("recover",) not in machine.calls  # nothing was extended: no log to cut
    assert again.history()[0]["event"] == "relaunch-aborted"


# ------------------------------------------------------------------ sealed volumes
# launch.sealed_volumes: block refuses a relaunch after which a TPM-sealed volume would not
# unlock (platform.sealed_volumes predicts it; tests/integration/test_sealed_volumes.py and
# the guest hold that prediction to systemd-cryptenroll and systemd-cryptsetup).

STAYS_LOCKED = {"name": "data", "device": "UUID=1234", "pcrs": [7, 11],
                "unlocks_after_relaunch": False, "stale_pcrs": [],
                "reason": "PCR 11 is extended by systemd-pcrphase on the way down",
                "remedy": "re-enrol against PCR 7 only, or keep a recovery key"}
UNLOCKS = {"name": "swap", "device": "/dev/vdb", "pcrs": [7],
           "unlocks_after_relaunch": True, "stale_pcrs": [], "reason": "PCR 7 survives",
           "remedy": None, "tokens": [{"token": 0}]}
UNREADABLE = {"name": "gone", "device": "/dev/sdz", "pcrs": [],
              "unlocks_after_relaunch": False, "stale_pcrs": [],
              "reason": "cannot open /dev/sdz: No such file", "remedy": "check the device",
              "error": "No such file"}


def test_a_volume_that_would_stay_locked_refuses_the_relaunch(env):
    engine, _ = staged_engine(env)
    env.machine.volumes = [UNLOCKS, STAYS_LOCKED, UNREADABLE]
    with pytest.raises(NotReady) as refused:
        engine.relaunch()
    message = str(refused.value)
    assert message.startswith("TPM-sealed volume(s) would not unlock after the relaunch: "
                              "data (PCR 11 is extended by systemd-pcrphase on the way down; "
                              "re-enrol against PCR 7 only, or keep a recovery key)")
    assert "swap" not in message and "gone" not in message   # unlocks / cannot tell
    assert "launch.sealed_volumes: report" in message
    assert engine.state == "staged" and "measure" not in env.machine.names()
    assert not env.pending_json.exists()
    engine.relaunch(force=True)
    assert engine.history()[0]["detail"]["overridden"] == [message.split("; set launch")[0]]


def test_sealed_volumes_report_only_relaunches(env):
    env.config = dataclasses.replace(env.config, launch=LaunchConfig(sealed_volumes="report"))
    engine, _ = staged_engine(env)
    env.machine.volumes = [STAYS_LOCKED]
    engine.relaunch()
    assert engine.state == "relaunching"
    assert engine.capabilities["volumes"] == [STAYS_LOCKED]


def test_a_volume_that_would_stay_locked_falls_back_to_a_firmware_reboot(env):
    """What an orchestrator wants: the firmware reboot resets the PCRs, so it unlocks."""
    machine = FakeMachine()
    engine = staged_on(env, machine)
    machine.volumes = [STAYS_LOCKED]
    engine.relaunch(fallback="reboot")
    assert machine.calls[-1] == ("handoff", "reboot") and "measure" not in machine.names()
    assert pending(env.config)["fallback_reason"].startswith(
        "NotReady: TPM-sealed volume(s) would not unlock")


def test_capabilities_summarise_each_volume_for_the_best_method(env):
    env.machine.volumes = [UNLOCKS]
    engine = env.engine()
    assert engine.capabilities["volumes"] == [
        {k: v for k, v in UNLOCKS.items() if k != "tokens"}]     # no per-token detail
