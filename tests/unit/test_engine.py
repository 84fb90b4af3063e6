"""The engine's state machine with a fake machine (tests/support/fakes.py): transitions,
Busy, cancel, failure without leftovers, reconcile, relaunch hand-off and roll-back, notify."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relaunchd.engine import core, state
from relaunchd.engine.config import Config, LaunchConfig, TrustConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    Busy,
    InvalidArgument,
    InvalidImage,
    KexecFailed,
    NotReady,
    NotStaged,
    QuiesceFailed,
    RelaunchError,
    VerificationFailed,
)
from relaunchd.platform.tpm_extend_log import ReplayResult
from support.fakes import BOOT_ID, FakeMachine, FakeStaged, make_report

PROPERTIES = set(core.PROPERTIES)


class Recorder:
    """The notify callback: every set of names, from any thread."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.states: list[str] = []

    def __call__(self, names: set[str]) -> None:
        with self.lock:
            self.calls.append(set(names))
            if self.engine is not None and "state" in names:
                self.states.append(self.engine.state)   # reading inside notify must work

    def all(self) -> set[str]:
        return set().union(*self.calls) if self.calls else set()

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if name in c)


@dataclass
class Env:
    config: Config
    machine: FakeMachine
    notes: Recorder
    image: str
    tmp: Path

    def engine(self, **kw) -> Engine:
        engine = Engine(self.config, self.machine, notify=self.notes, **kw)
        self.notes.engine = engine
        return engine

    @property
    def staged_json(self) -> Path:
        return Path(self.config.runtime_dir) / state.STAGED

    @property
    def pending_json(self) -> Path:
        return Path(self.config.state_dir) / state.PENDING


def make_config(tmp: Path, cert: str | None, **kw) -> Config:
    return Config(root=str(tmp / "platform"), state_dir=str(tmp / "state"),
                  runtime_dir=str(tmp / "run"), image_dirs=(str(tmp / "images"),),
                  trust=TrustConfig(certificates=(cert,) if cert else ()), **kw)


@pytest.fixture
def env(tmp_path, keys) -> Env:
    (tmp_path / "images").mkdir(mode=0o755)
    image = tmp_path / "images" / "linux.efi"
    image.write_bytes(b"MZ not really a UKI; the fake platform never parses it")
    (tmp_path / "platform").mkdir()
    return Env(make_config(tmp_path, str(keys["db"].cert)), FakeMachine(), Recorder(),
               str(image), tmp_path)


def staged_engine(env: Env) -> tuple[Engine, str]:
    engine = env.engine()
    relaunch_id = engine.stage(env.image)
    assert engine.wait(5) == "staged"
    return engine, relaunch_id


# ------------------------------------------------------------------ properties

def test_initial_properties(env):
    engine = env.engine()
    assert engine.state == "idle"
    assert engine.progress == {"step": "", "done": 0, "total": 0, "percent": 0}
    assert engine.staged_image == {}
    assert engine.can_relaunch == "no"
    assert engine.last_error == {} and engine.last_relaunch == {}
    assert engine.version
    caps = engine.capabilities
    assert caps["kexec"] == {"ready": True, "reasons": []}
    assert caps["txt"] == {"ready": False, "reasons": ["txt-missing"]}
    assert caps["best"] == "kexec"
    json.dumps([engine.progress, engine.staged_image, caps, engine.last_error])
    caps["best"] = "mutated"
    assert engine.capabilities["best"] == "kexec"     # copies, not the engine's own dicts
    assert env.machine.names() == []                 # nothing loaded, nothing unloaded


def test_can_relaunch_na_without_kexec(env):
    env.machine.report = make_report(ready=set(), kexec_core=False)
    engine = env.engine()
    assert engine.can_relaunch == "na"
    assert engine.capabilities["best"] is None


def test_can_relaunch_na_when_drtm_required_but_absent(env, tmp_path):
    env.config = make_config(tmp_path, env.config.trust.certificates[0],
                             launch=LaunchConfig(require_drtm=True))
    engine = env.engine()
    assert engine.can_relaunch == "na" and engine.capabilities["best"] is None
    with pytest.raises(NotReady, match="require_drtm"):
        engine.stage(env.image)
    with pytest.raises(NotReady, match="require_drtm"):
        engine.stage(env.image, method="kexec")


def test_best_prefers_drtm(env):
    env.machine.report = make_report(ready={"txt", "kexec"})
    engine = env.engine()
    assert engine.capabilities["best"] == "txt"


# ------------------------------------------------------------------ stage

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


def test_concurrent_stage_one_busy(env):
    env.machine.release_prepare.clear()
    engine = env.engine()
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def call():
        barrier.wait()
        try:
            results.append(engine.stage(env.image))
        except Busy as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(type(r).__name__ for r in results) == ["Busy", "str"]
    assert engine.state == "staging"
    with pytest.raises(Busy):
        engine.relaunch()
    with pytest.raises(Busy):
        engine.reconcile()
    env.machine.release_prepare.set()
    assert engine.wait(5) == "staged"
    assert env.machine.names().count("prepare") == 1


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
    engine.cancel()
    assert engine.progress["step"] in ("cancelling", "verifying")
    engine.cancel()                             # asking twice is harmless
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


def test_progress_throttled(env):
    env.machine.progress_calls = 400
    env.machine.progress_delay = 0.001
    engine = env.engine()
    start = time.monotonic()
    engine.stage(env.image)
    engine.wait(10)
    elapsed = time.monotonic() - start
    # ≤ 10/s from the throttle, plus the few forced ones at step changes
    assert env.notes.count("progress") <= elapsed * 10 + 8
    assert env.notes.count("progress") >= 2


def test_progress_percent_grows(env):
    env.machine.release_prepare.clear()
    env.machine.progress_calls = 3
    engine = env.engine()
    engine.stage(env.image)
    env.machine.in_prepare.wait(5)
    time.sleep(0.05)
    mid = engine.progress
    assert mid["step"] == "verifying" and 0 < mid["percent"] < 100
    env.machine.release_prepare.set()
    engine.wait(5)
    assert engine.progress["percent"] == 100


def test_notify_errors_do_not_break_the_engine(env):
    def broken(names):
        raise RuntimeError("adapter bug")

    engine = Engine(env.config, env.machine, notify=broken)
    engine.stage(env.image)
    assert engine.wait(5) == "staged"


# ------------------------------------------------------------------ reconcile

def write_record(env: Env, relaunch_id: str = "old-id") -> None:
    store = state.StateStore(env.config.state_dir, env.config.runtime_dir)
    store.save_staged(state.StagedRecord(
        id=relaunch_id, path=env.image, method="kexec", loader="file",
        kernel_sha256="aa" * 32, initrd_sha256=None, cmdline="x", staged_at=state.now()))


@pytest.mark.parametrize(("record", "loaded", "expect_state", "expect_calls", "keeps_record"), [
    (True, True, "staged", [], True),
    (True, False, "idle", [], False),
    (True, None, "idle", [], False),
    (False, True, "idle", ["unload"], False),
    (False, False, "idle", [], False),
])
def test_reconcile_at_start(env, record, loaded, expect_state, expect_calls, keeps_record):
    if record:
        write_record(env)
    env.machine.loaded = loaded
    engine = env.engine()
    assert engine.state == expect_state
    assert env.machine.names() == expect_calls
    assert env.staged_json.exists() == keeps_record
    if expect_state == "staged":
        assert engine.staged_image["id"] == "old-id"
        assert engine.staged_image["initrd_sha256"] == ""
        assert engine.can_relaunch == "yes"
    else:
        assert engine.staged_image == {}
        assert env.machine.loaded is not True
    if record and not loaded:
        assert engine.history()[0]["event"] == "staged-lost"


def test_reconcile_unload_failure_is_failed_state(env):
    env.machine.loaded = True
    env.machine.fail_unload = KexecFailed("cannot unload")
    engine = env.engine()
    assert engine.state == "failed"
    assert engine.last_error["name"] == "KexecFailed"


def test_reconcile_later_when_image_vanished(env):
    engine, _ = staged_engine(env)
    env.machine.loaded = False           # someone ran `kexec -u`
    engine.reconcile()
    assert engine.state == "idle" and not env.staged_json.exists()
    assert env.machine.staged[0].closed == 1


def test_reconcile_corrupt_record(env):
    env.staged_json.parent.mkdir(parents=True, exist_ok=True)
    env.staged_json.write_text("{garbage")
    env.machine.loaded = True
    engine = env.engine()
    assert engine.state == "idle" and env.machine.names() == ["unload"]
    assert any(p.name.startswith("staged.json.corrupt-") for p in env.staged_json.parent.iterdir())


# ------------------------------------------------------------------ relaunch

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


def test_stage_records_digests_and_the_quiesce_plan(env):
    engine, relaunch_id = staged_engine(env)
    record = json.loads(env.staged_json.read_text())
    assert record["digests"]["kernel"] == {"sha256": "01" * 32}
    assert record["quiesce"]["offline_cpus"] == [1]
    plan = json.loads((Path(env.config.runtime_dir) / state.QUIESCE_PLAN).read_text())
    assert plan["id"] == relaunch_id and plan["plan"]["offline_cpus"] == [1]
    engine.cancel()
    assert not (Path(env.config.runtime_dir) / state.QUIESCE_PLAN).exists()


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
    env.machine.inhibitors = [{"what": "shutdown", "who": "apt", "why": "upgrading",
                                "mode": "block", "uid": 0, "pid": 4242}]
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


# ------------------------------------------------------------------ after the new boot

def relaunched(env: Env, **pending_changes) -> None:
    """An engine relaunches (fake hand-off), then the machine 'boots' into facts."""
    engine, _ = staged_engine(env)
    engine.relaunch()
    engine.close()
    if pending_changes:
        data = json.loads(env.pending_json.read_text())
        data.update(pending_changes)
        env.pending_json.write_text(json.dumps(data))
    new_boot(env)
    env.machine.calls.clear()


def new_boot(env: Env) -> None:
    """What a reboot does to the fakes: new boot id, /run emptied, no kexec image."""
    env.machine.boot = "new-boot"
    for path in Path(env.config.runtime_dir).iterdir():
        path.unlink()
    env.machine.loaded = False


def test_new_boot_proves_the_relaunch(env):
    relaunched(env)
    env.machine.facts = dataclasses.replace(env.machine.facts,
                                             kernel_started=time.time())
    engine = env.engine()
    last = engine.last_relaunch
    assert last["verified"] is True, last["mismatches"]
    assert last["measured"] is True and last["drtm"] is False and last["mismatches"] == []
    assert last["previous_boot_id"] == BOOT_ID and last["boot_id"] == "new-boot"
    assert last["downtime_ms"] >= 0 and set(last["phases"]) == {"down_ms", "up_ms"}
    assert not env.pending_json.exists()
    assert engine.history()[0]["event"] == "relaunch-verified"
    assert json.loads((Path(env.config.state_dir) / "last-relaunch.json").read_text()) == last
    assert env.engine().last_relaunch == last          # kept across restarts


@pytest.mark.parametrize("what, expect", [
    ("cmdline", "/proc/cmdline is"),
    ("reset", "the TPM was reset since the hand-off"),
    ("log", "PCR 23 sha256: log replays"),
    ("boot_id", "the boot id did not change"),
])
def test_new_boot_that_is_not_the_staged_one_is_unverified(env, what, expect):
    relaunched(env)
    p = env.machine
    if what == "cmdline":
        p.facts = dataclasses.replace(p.facts, cmdline="console=ttyS0 quiet\n")
    elif what == "reset":
        p.reset_count = 8
    elif what == "log":
        p.verdict = ReplayResult(False, {"sha256": "aa"}, {"sha256": "bb"},
                            ("PCR 23 sha256: log replays to aa, TPM has bb",))
    else:
        p.facts = dataclasses.replace(p.facts, boot_id=BOOT_ID)
        # the boot id file says new-boot, so the engine treats it as a new boot, but
        # the facts it gathers disagree: the outcome must still fail
    engine = env.engine()
    last = engine.last_relaunch
    assert last["verified"] is False
    assert any(expect in m for m in last["mismatches"]), last["mismatches"]
    assert engine.history()[0]["event"] == "relaunch-unverified"


def test_unmeasured_relaunch_is_verified_without_a_tpm_check(env):
    env.machine.tpm = False
    relaunched(env)
    env.machine.verdict = ReplayResult(False, {}, {}, ("would fail",))
    last = env.engine().last_relaunch
    assert last["verified"] is True and last["measured"] is False


def test_restart_in_the_same_boot_reports_an_aborted_relaunch(env):
    engine, relaunch_id = staged_engine(env)
    engine.relaunch()
    engine.close()         # as if SIGKILLed after the hand-off request, no new boot
    env.machine.calls.clear()
    env.machine.dropped = 3
    again = env.engine()
    assert again.state == "staged"                     # still loaded: can try again
    assert again.last_error["name"] == "RelaunchAborted"
    assert "3 measurement records" in again.last_error["message"]
    assert ("recover",) in env.machine.calls
    assert not env.pending_json.exists()
    assert not (Path(env.config.runtime_dir) / state.HANDOFF).exists()
    assert again.history()[0]["event"] == "relaunch-aborted"
    assert again.last_relaunch == {}
    again.relaunch()
    assert again.state == "relaunching"


def test_metrics_textfile(env, tmp_path):
    """The daemon's exporter follows the engine's changes (as daemon.serve wires it)."""
    from relaunchd.prometheus import TextfileExporter

    prom = tmp_path / "textfile" / "relaunchd.prom"
    prom.parent.mkdir()
    exporters: list[TextfileExporter] = []

    def engine_with_exporter() -> Engine:
        def notify(names: set[str]) -> None:
            for exporter in exporters:
                exporter(names)

        engine = Engine(env.config, env.machine, notify=notify)
        exporters[:] = [TextfileExporter(engine, str(prom))]
        exporters[0].export()
        return engine

    engine = engine_with_exporter()
    relaunch_id = engine.stage(env.image)
    assert engine.wait(5) == "staged", relaunch_id
    assert "relaunchd_staged 1" in prom.read_text()
    engine.relaunch()
    engine.close()
    new_boot(env)
    engine_with_exporter()
    text = prom.read_text()
    assert "relaunchd_last_relaunch_verified 1" in text
    assert 'relaunchd_relaunches_total{result="verified"} 1' in text
    assert "relaunchd_staged 0" in text


# ------------------------------------------------------------------ queries

def test_check(env):
    engine = env.engine()
    result = engine.check()
    assert result["method"] == "auto" and result["ready"] is True
    assert result["best"] == "kexec" and "methods" in result
    assert engine.check("txt")["ready"] is False
    with pytest.raises(InvalidArgument):
        engine.check("grub")
    env.machine.report = make_report(ready={"skinit", "kexec"})
    env.notes.calls.clear()
    engine.check()
    assert "capabilities" in env.notes.all()
    assert engine.capabilities["best"] == "skinit"


def test_list_images_reports_invalid(env):
    engine = env.engine()
    (env.tmp / "images" / "notes.txt").write_text("ignored")
    images = [item for item in engine.list_images() if item["kind"] == "image"]
    assert len(images) == 1
    entry = images[0]
    assert entry["path"] == env.image and entry["size"] > 0 and "mtime" in entry
    assert "error" in entry
    json.dumps(images)


def test_inspect_invalid(env):
    with pytest.raises(InvalidImage):
        env.engine().inspect(env.image)


def test_history_limit(env):
    engine = env.engine()
    for _ in range(3):
        engine.stage(env.image)
        engine.wait(5)
    assert len(engine.history()) == 3
    assert len(engine.history(limit=1)) == 1
    assert engine.history(0) == []
    with pytest.raises(InvalidArgument):
        engine.history(-1)


def test_close_aborts_staging_and_keeps_staged_loaded(env):
    env.machine.release_prepare.clear()
    engine = env.engine()
    engine.stage(env.image)
    env.machine.in_prepare.wait(5)
    engine.close()
    assert engine.state == "idle" and env.machine.names() == ["prepare"]
    env.machine.release_prepare.set()
    engine2, _ = staged_engine(env)
    engine2.close()
    assert env.machine.loaded is True and env.staged_json.exists()
    assert env.machine.staged[-1].closed == 1


def test_restage_announces_every_change(env):
    engine, _ = staged_engine(env)
    env.notes.calls.clear()
    engine.stage(env.image)
    engine.wait(5)
    # StagedImage went {} while staging and back: both announced
    staged_image_calls = [c for c in env.notes.calls if "staged_image" in c]
    assert len(staged_image_calls) == 2
    assert env.notes.states == ["staging", "staged", "staging", "staged"]


def test_real_platform_handoff_runs_systemctl(tmp_path, monkeypatch):
    """The real hand-off queues kexec.target; a fake systemctl on PATH records it."""
    from relaunchd.engine.host_machine import HANDOFF_COMMAND, REBOOT_COMMAND, HostMachine

    log = tmp_path / "args"
    tool = tmp_path / "bin" / "systemctl"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\n[ -z "$FAIL" ] || {{ echo "$FAIL" >&2; '
                    'exit 1; }\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    platform = HostMachine()
    platform.handoff("systemd")
    assert log.read_text().split() == list(HANDOFF_COMMAND[1:])
    assert {"--job-mode=replace-irreversibly", "kexec.target"} <= set(HANDOFF_COMMAND)
    # Killed by the shutdown it started (systemd signals relaunchd's whole cgroup):
    # the hand-off was accepted.
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\nkill -TERM $$\n')
    platform.handoff("systemd")
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\n[ -z "$FAIL" ] || {{ echo "$FAIL" >&2; '
                    'exit 1; }\n')
    monkeypatch.setenv("FAIL", "Transaction is destructive.")
    with pytest.raises(RelaunchError, match="Transaction is destructive"):
        platform.handoff("systemd")
    monkeypatch.delenv("FAIL")
    platform.handoff("reboot")               # the fallback: an ordinary reboot, queued
    assert log.read_text().split() == list(REBOOT_COMMAND[1:])
    assert {"--job-mode=replace-irreversibly", "reboot.target"} <= set(REBOOT_COMMAND)
    with pytest.raises(InvalidArgument):
        platform.handoff("poweroff")


def test_a_drtm_relaunch_is_proven_against_the_drtm_log(env):
    """A txt relaunch: the pending record carries the SLRT-policy prediction, the new
    boot's facts the DRTM log and PCRs 17/18 (tests/unit/test_outcome_drtm.py builds
    them); the engine asks the platform for DRTM facts and publishes the verdict."""
    from support.drtmlog import launch_log, prediction

    relaunched(env, method="txt", loader="segments", predictions={"drtm": prediction()})
    log, values = launch_log()
    env.machine.facts = dataclasses.replace(
        env.machine.facts, slaunch=True, drtm_log=log,
        drtm_pcrs={"bank": "sha256", "values": values, "reset_state": False})
    last = env.engine().last_relaunch
    assert last["mismatches"] == [] and last["verified"] is True
    assert last["drtm"] is True and last["drtm_log"]["matched"] == 3


def test_a_drtm_log_with_a_changed_event_is_not_verified(env):
    from support.drtmlog import launch_log, prediction

    relaunched(env, method="txt", loader="segments", predictions={"drtm": prediction()})
    log, values = launch_log()
    tampered = bytearray(log)
    at = tampered.find(b"Measured Kernel command line") - 4 - 32   # its sha256 digest
    tampered[at] ^= 1
    env.machine.facts = dataclasses.replace(
        env.machine.facts, slaunch=True, drtm_log=bytes(tampered),
        drtm_pcrs={"bank": "sha256", "values": values, "reset_state": False})
    last = env.engine().last_relaunch
    assert last["verified"] is False and last["drtm"] is False
    assert any("does not replay to PCR 17" in m for m in last["mismatches"])
    assert any("'Measured Kernel command line' (PCR 17) sha256" in m
               for m in last["mismatches"])


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
