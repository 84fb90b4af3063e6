"""Staging (relaunchd.engine.stage) over the FakeMachine: the options built from the request
and the configuration, requests refused before any work, failures and cancellation that
leave nothing loaded or recorded, restaging, and the staged record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.errors import (
    InvalidArgument,
    InvalidImage,
    KexecFailed,
    NotStaged,
    VerificationFailed,
)
from support.engine_env import (
    PROPERTIES,
    make_config,
    staged_engine,
)
from support.fakes import FakeStaged, make_report


def test_stage_to_staged(env):
    engine = env.engine()
    relaunch_id = engine.stage(env.image, append=["quiet"], cmdline="x=1", profile=0)
    assert engine.wait(5) == "staged"
    assert env.machine.names() == ["prepare", "load"]
    options = env.machine.options[0]
    assert options.relaunch_id == relaunch_id and options.method == "kexec"
    assert options.append == ["quiet"] and options.custom_cmdline == "x=1"
    assert options.profile == 0 and options.add_id_argument is True
    assert options.policy.allowed_dirs == env.config.image_dirs
    assert len(options.trusted) == 1
    image = engine.staged_image
    assert image == {"id": relaunch_id, "path": env.image, "method": "kexec", "loader": "file",
                     "kernel_sha256": "11" * 32, "initrd_sha256": "22" * 32,
                     "cmdline": "console=ttyS0", "staged_at": image["staged_at"]}
    record = json.loads(env.staged_json.read_text())
    assert record["id"] == relaunch_id and record["kernel_sha256"] == "11" * 32
    assert record["predictions"]["pcr11"] == {"sha256": "33" * 32}
    assert engine.can_relaunch == "yes"
    assert engine.progress["percent"] == 100
    assert {"state", "progress", "staged_image", "can_relaunch"} <= env.notes.all()
    assert env.notes.all() <= PROPERTIES
    assert env.notes.states == ["staging", "staged"]
    assert [h["event"] for h in engine.history()] == ["staged"]
    assert env.machine.staged[0].closed == 0          # memfds stay open while staged


def test_stage_uses_configured_append_and_method(env, tmp_path):
    from relaunchd.engine.config import CmdlineConfig

    env.config = make_config(tmp_path, env.config.trust.certificates[0],
                             cmdline=CmdlineConfig(append=("a=1",), id_argument=False))
    env.machine.report = make_report(ready={"txt", "kexec"})
    engine = env.engine()
    engine.stage(env.image, append=("b=2",))
    engine.wait(5)
    options = env.machine.options[0]
    assert options.append == ["a=1", "b=2"] and options.add_id_argument is False
    assert options.method == "txt" and options.effective_loader == "segments"
    # The launch method looks where the configuration says (the same probe configuration
    # Capabilities come from), under the configured root.
    assert options.probe_config.root == env.config.root == options.root.root
    assert options.probe_config.dl_handler == env.config.txt.dl_handler
    assert options.probe_config.acm_dirs == env.config.txt.sinit_acm_dirs


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"path": "relative.efi"}, InvalidArgument),
    ({"method": "grub"}, InvalidArgument),
    ({"loader": "magic"}, InvalidArgument),
    ({"profile": -1}, InvalidArgument),
    ({"append": "quiet"}, InvalidArgument),
    ({"path": "/etc/passwd"}, InvalidImage),
])
def test_stage_refused_synchronously(env, kwargs, error):
    engine = env.engine()
    path = kwargs.pop("path", env.image)
    with pytest.raises(error):
        engine.stage(path, **kwargs)
    assert engine.state == "idle" and engine.last_error == {}
    assert env.machine.calls == []
    engine.stage(env.image)                   # the op lock was released
    assert engine.wait(5) == "staged"


def test_stage_without_trust_refused(env, tmp_path):
    env.config = make_config(tmp_path, None)
    engine = env.engine()
    with pytest.raises(VerificationFailed, match="trust.certificates"):
        engine.stage(env.image)
    assert engine.state == "idle"


def test_stage_missing_certificate_file(env, tmp_path):
    env.config = make_config(tmp_path, str(tmp_path / "missing.pem"))
    with pytest.raises(InvalidArgument, match="missing.pem"):
        env.engine().stage(env.image)


@pytest.mark.parametrize("where", ["prepare", "load", "load-not-loaded"])
def test_stage_failure_leaves_nothing(env, where):
    if where == "prepare":
        env.machine.fail_prepare = VerificationFailed("bad signature")
    elif where == "load":
        env.machine.fail_load = KexecFailed("kexec_file_load: EPERM")
    else:
        env.machine.load_leaves_unloaded = True
    engine = env.engine()
    relaunch_id = engine.stage(env.image)
    assert engine.wait(5) == "failed"
    error = engine.last_error
    expected = {"prepare": "VerificationFailed", "load": "KexecFailed",
                "load-not-loaded": "KexecFailed"}[where]
    assert error["name"] == expected and error["message"] and error["time"]
    assert not env.staged_json.exists()
    assert env.machine.loaded is False
    assert engine.staged_image == {} and engine.can_relaunch == "no"
    assert all(s.closed == 1 for s in env.machine.staged)
    assert engine.history()[0]["event"] == "stage-failed"
    assert engine.history()[0]["id"] == relaunch_id
    assert "last_error" in env.notes.all()
    # failed is not a dead end: a new stage clears LastError
    env.machine.fail_prepare = env.machine.fail_load = None
    env.machine.load_leaves_unloaded = False
    engine.stage(env.image)
    assert engine.wait(5) == "staged" and engine.last_error == {}


def test_unexpected_exception_becomes_failed(env):
    env.machine.fail_prepare = ZeroDivisionError("bug")
    engine = env.engine()
    engine.stage(env.image)
    assert engine.wait(5) == "failed"
    assert engine.last_error["name"] == "Failed"
    assert "ZeroDivisionError" in engine.last_error["message"]


def test_failure_after_partial_load_unloads(env, monkeypatch):
    """If recording fails after the load, the image is unloaded again."""
    engine = env.engine()

    def broken(record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.store, "save_staged", broken)
    engine.stage(env.image)
    assert engine.wait(5) == "failed"
    assert env.machine.names() == ["prepare", "load", "unload"]
    assert env.machine.loaded is False and not env.staged_json.exists()
    assert "No space left" in engine.last_error["message"]


def test_stage_returns_before_work_is_done(env):
    env.machine.release_prepare.clear()
    engine = env.engine()
    start = time.monotonic()
    engine.stage(env.image)
    assert time.monotonic() - start < 1
    assert env.machine.in_prepare.wait(5)
    assert engine.state == "staging"
    assert engine.wait(0.05) == "staging"      # wait() times out
    env.machine.release_prepare.set()
    assert engine.wait(5) == "staged"


def test_cancel_during_prepare(env):
    env.machine.release_prepare.clear()
    engine = env.engine()
    relaunch_id = engine.stage(env.image)
    assert env.machine.in_prepare.wait(5)
    engine.cancel()                             # returns once the stage has stopped
    assert engine.state == "idle" and engine.progress["step"] == ""
    with pytest.raises(NotStaged):
        engine.cancel()                         # nothing left to cancel
    assert engine.wait(5) == "idle"
    assert env.machine.names() == ["prepare"]  # aborted inside prepare: nothing loaded
    assert not env.staged_json.exists() and engine.last_error == {}
    assert engine.history()[0] == {**engine.history()[0], "event": "cancelled",
                                    "id": relaunch_id}
    assert env.notes.states[-1] == "idle"


def test_cancel_during_load_unloads(env):
    env.machine.release_load.clear()
    engine = env.engine()
    engine.stage(env.image)
    assert env.machine.in_load.wait(5)
    engine.cancel()
    env.machine.release_load.set()
    assert engine.wait(5) == "idle"
    assert env.machine.names() == ["prepare", "load", "unload"]
    assert env.machine.loaded is False and not env.staged_json.exists()
    assert env.machine.staged[0].closed == 1


def test_cancel_staged_unloads(env):
    engine, relaunch_id = staged_engine(env)
    engine.cancel()
    assert engine.state == "idle"
    assert env.machine.names()[-1] == "unload" and env.machine.loaded is False
    assert not env.staged_json.exists()
    assert env.machine.staged[0].closed == 1
    assert engine.staged_image == {} and engine.can_relaunch == "no"
    assert engine.history()[0]["event"] == "unstaged"
    with pytest.raises(NotStaged):
        engine.cancel()


def test_cancel_staged_unload_failure_keeps_staged(env):
    engine, _ = staged_engine(env)
    env.machine.fail_unload = KexecFailed("EBUSY")
    with pytest.raises(KexecFailed):
        engine.cancel()
    assert engine.state == "staged" and env.staged_json.exists()
    assert env.machine.staged[0].closed == 0


def test_cancel_when_idle_or_failed(env):
    engine = env.engine()
    with pytest.raises(NotStaged):
        engine.cancel()
    env.machine.fail_prepare = InvalidImage("nope")
    engine.stage(env.image)
    engine.wait(5)
    with pytest.raises(NotStaged):
        engine.cancel()


def test_restage_unloads_first(env):
    engine, first = staged_engine(env)
    second = engine.stage(env.image)
    assert engine.wait(5) == "staged"
    assert second != first
    assert env.machine.names() == ["prepare", "load", "unload", "prepare", "load"]
    assert env.machine.staged[0].closed == 1 and env.machine.staged[1].closed == 0
    assert engine.staged_image["id"] == second
    assert json.loads(env.staged_json.read_text())["id"] == second


def test_stage_records_digests_and_the_quiesce_plan(env):
    engine, relaunch_id = staged_engine(env)
    record = json.loads(env.staged_json.read_text())
    assert record["digests"]["kernel"] == {"sha256": "01" * 32}
    assert record["quiesce"]["offline_cpus"] == [1]
    plan = json.loads((Path(env.config.runtime_dir) / state.QUIESCE_PLAN).read_text())
    assert plan["id"] == relaunch_id and plan["plan"]["offline_cpus"] == [1]
    engine.cancel()
    assert not (Path(env.config.runtime_dir) / state.QUIESCE_PLAN).exists()


def test_the_staged_record_keeps_the_drtm_prediction():
    from relaunchd.engine.stage import record_for as _record_for

    class Staged(FakeStaged):
        def plan(self) -> dict:
            return {**super().plan(), "drtm": prediction_json}

    prediction_json = {"seal_pcr": 17, "events": [{"pcr": 17, "label": "x",
                                                  "event_type": 0x502, "digests": {}}]}
    record = _record_for(Staged("r-9", "/boot/x.efi", "txt", "segments"))
    assert record.predictions["drtm"] == prediction_json
    assert "drtm" not in _record_for(FakeStaged("r-8", "/boot/y.efi", "kexec",
                                                "file")).predictions
