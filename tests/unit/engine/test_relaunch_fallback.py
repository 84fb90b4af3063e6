"""`Relaunch` with `fallback: reboot`: when the relaunch cannot happen, an ordinary firmware
reboot, recorded, and reported by the next boot as a fallback — never as verified."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.engine.config import Config, LaunchConfig, TrustConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    Inhibited,
    InvalidArgument,
    NotStaged,
    RelaunchAborted,
    RelaunchError,
)
from support.fakes import FakeMachine, make_report


class HandoffRefusedOnce(FakeMachine):
    """systemd refuses kexec.target; reboot.target is queued."""

    def handoff(self, kind: str) -> None:
        self.calls.append(("handoff", kind))
        if kind == "systemd":
            raise RelaunchError("systemctl start … kexec.target failed: Transaction is "
                                "destructive.")


@pytest.fixture
def env(tmp_path, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    image = images / "linux.efi"
    image.write_bytes(b"MZ the fake machine never parses it")
    (tmp_path / "platform").mkdir()
    config = Config(root=str(tmp_path / "platform"), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(images),),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),)))
    return config, str(image)


def pending(config: Config) -> dict:
    return json.loads((Path(config.state_dir) / state.PENDING).read_text())


def staged(config: Config, machine: FakeMachine, image: str) -> Engine:
    engine = Engine(config, machine)
    engine.stage(image)
    assert engine.wait(5) == "staged"
    return engine


def test_nothing_staged_falls_back_to_a_recorded_reboot(env):
    config, _ = env
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
    config, _ = env
    machine = FakeMachine()
    engine = Engine(config, machine)
    with pytest.raises(NotStaged):
        engine.relaunch()
    with pytest.raises(NotStaged):
        engine.relaunch(fallback="none")
    assert not any(c[0] == "handoff" for c in machine.calls)
    assert not (Path(config.state_dir) / state.PENDING).exists()


def test_the_configured_default_applies(env):
    config, _ = env
    config = dataclasses.replace(config, launch=LaunchConfig(fallback="reboot"))
    machine = FakeMachine()
    Engine(config, machine).relaunch()
    assert machine.calls[-1] == ("handoff", "reboot")
    machine2 = FakeMachine()
    with pytest.raises(NotStaged):          # the call's option wins over the default
        Engine(config, machine2).relaunch(fallback="none")


def test_a_method_no_longer_ready_unloads_then_reboots(env):
    config, image = env
    machine = FakeMachine()
    engine = staged(config, machine, image)
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
    config, image = env
    machine = HandoffRefusedOnce()
    engine = staged(config, machine, image)
    engine.relaunch(fallback="reboot")
    assert [c for c in machine.calls if c[0] == "handoff"] == [("handoff", "systemd"),
                                                             ("handoff", "reboot")]
    assert pending(config)["fallback_reason"].startswith("Failed: systemctl")
    events = [e["event"] for e in engine.history()]
    assert events[:2] == ["relaunch-fallback", "relaunch-failed"]


def test_inhibitors_are_never_rebooted_past(env):
    config, image = env
    machine = FakeMachine()
    engine = staged(config, machine, image)
    machine.inhibitors = [{"what": "shutdown", "who": "backup", "why": "copying",
                           "mode": "block", "uid": 0, "pid": 42}]
    with pytest.raises(Inhibited):
        engine.relaunch(fallback="reboot")
    assert not any(c[0] == "handoff" for c in machine.calls)
    assert engine.state == "staged" and machine.loaded is True


def test_a_failed_fallback_reboot_is_reported_and_leaves_no_pending_record(env):
    config, _ = env
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
    config, _ = env
    with pytest.raises(InvalidArgument, match=match):
        Engine(config, FakeMachine()).relaunch(**kwargs)


def test_the_next_boot_reports_a_fallback_never_verified(env):
    config, image = env
    machine = FakeMachine()
    engine = staged(config, machine, image)
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
    config, _ = env
    machine = FakeMachine()
    engine = Engine(config, machine)
    engine.relaunch(fallback="reboot")
    engine.close()
    again = Engine(config, machine)           # same boot id: the reboot did not happen
    assert again.last_error["name"] == RelaunchAborted.name
    assert ("recover",) not in machine.calls  # nothing was extended: no log to cut
    assert again.history()[0]["event"] == "relaunch-aborted"
