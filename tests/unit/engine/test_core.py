"""The engine's core (relaunchd.engine.core) over the in-memory FakeMachine
(tests/support/fakes.py): properties and Capabilities, one operation at a time, change
notification and its throttling, reconcile with the kernel, Check, history, close."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from relaunchd.engine.config import LaunchConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    Busy,
    InvalidArgument,
    KexecFailed,
    NotReady,
)
from relaunchd.platform import quiesce
from support.engine_env import (
    EngineEnv,
    make_config,
    staged_engine,
    write_record,
)
from support.fakes import FakeMachine, make_report


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


def test_restage_announces_every_change(env):
    engine, _ = staged_engine(env)
    env.notes.calls.clear()
    engine.stage(env.image)
    engine.wait(5)
    # StagedImage showed the first image while staging, then the second: announced once
    staged_image_calls = [c for c in env.notes.calls if "staged_image" in c]
    assert len(staged_image_calls) == 1
    assert env.notes.states == ["staging", "staged", "staging", "staged"]


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


# ------------------------------------------------------------------
# StagedImage.quiesce: the plan summary

NOTE = "could not inspect 3 processes: missing CAP_SYS_PTRACE"


class ScanRefused(FakeMachine):
    def quiesce_plan(self, policy):
        return quiesce.QuiescePlan(
            reboot_cpu=0, offline_cpus=(1,), kept_cpus=(), devices=(),
            holders=(quiesce.Holder(42, "tpm2-abrmd", "/dev/tpmrm0"),), notes=(NOTE,),
            uninspected=3)


def test_staged_image_says_how_many_processes_were_not_inspected(tmp_path, keys):
    env = EngineEnv.create(tmp_path, str(keys["db"].cert), ScanRefused())
    engine = env.engine()
    engine.stage(env.make_image("a.efi"))
    assert engine.wait(5) == "staged"
    summary = engine.staged_image["quiesce"]
    assert summary["uninspected"] == 3 and summary["notes"] == [NOTE]
    assert summary["holders"] == [{"pid": 42, "comm": "tpm2-abrmd", "path": "/dev/tpmrm0"}]
    assert summary["offline_cpus"] == [1]
    # the plan the shutdown hook reads keeps the count too
    plan = engine.store.load_runtime("quiesce-plan.json")["plan"]
    assert plan["uninspected"] == 3 and NOTE in plan["notes"]
    assert quiesce.QuiescePlan.from_json(json.dumps(plan)).uninspected == 3
