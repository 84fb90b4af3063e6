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
    EngineEnv,
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
                     "cmdline": "console=ttyS0", "staged_at": image["staged_at"],
                     "quiesce": image["quiesce"]}
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


def test_restage_loads_over_the_staged_image(env):
    # The kernel replaces a loaded image only once the new one is complete; no unload
    # first, so a failing replacement cannot lose it (test_stage_replace.py).
    engine, first = staged_engine(env)
    second = engine.stage(env.image)
    assert engine.wait(5) == "staged"
    assert second != first
    assert env.machine.names() == ["prepare", "load", "prepare", "load"]
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


# ------------------------------------------------------------------ a rejected Stage
# keeps the staged image (issue 14 item 10); `renv`: an engine environment with named images

@pytest.fixture
def renv(tmp_path, keys) -> EngineEnv:
    return EngineEnv.create(tmp_path, str(keys["db"].cert))


@pytest.fixture
def staged_a(renv):
    engine = renv.engine()
    a_path = renv.image("a.efi")
    a = engine.stage(a_path)
    assert engine.wait(5) == "staged"
    return engine, a, a_path


def a_is_still_staged(renv: EngineEnv, engine, a: str, a_path: str) -> None:
    assert engine.state == "staged" and engine.can_relaunch == "yes"
    assert engine.staged_image["id"] == a and engine.staged_image["path"] == a_path
    assert renv.machine.loaded is True and renv.machine.loaded_source == a_path
    assert json.loads(renv.staged_json.read_text())["id"] == a
    assert json.loads(renv.quiesce_plan_json.read_text())["id"] == a
    assert renv.machine.staged[0].closed == 0            # A's memfds stay open


def fail_b(renv: EngineEnv, engine, b_path: str):
    b = engine.stage(b_path)
    engine.wait(5)
    return b


def save_staged_fails_for(engine, name: str) -> None:
    """Recording an image named `name` fails as a full disk would."""
    real = engine.store.save_staged

    def save(record):
        if record.path.endswith("/" + name):
            raise OSError(28, "No space left on device")
        real(record)
    engine.store.save_staged = save


def _plan_save_fails_for_b(renv, engine):
    real = engine.store.save_runtime

    def save(name, value):
        if name == state.QUIESCE_PLAN and value["id"] != engine.record.id:
            raise OSError(28, "No space left on device")
        real(name, value)
    engine.store.save_runtime = save


# (what fails, how to make it fail, the error, was A loaded again from its memfds?)
FAILURES = [
    ("verification", lambda renv, engine, b: renv.machine.fail_prepare_for.update(
        {b: VerificationFailed("b.efi: the signature does not verify")}),
     "VerificationFailed", False),
    ("bad file", lambda renv, engine, b: renv.machine.fail_prepare_for.update(
        {b: InvalidImage("b.efi: not a PE file")}), "InvalidImage", False),
    ("digests", lambda renv, engine, b: setattr(renv.machine, "fail_digests",
                                               OSError(5, "Input/output error")),
     "Failed", False),
    ("quiesce plan", lambda renv, engine, b: setattr(
        renv.machine, "fail_quiesce_plan", InvalidArgument("no PCI device 0000:09:00.0")),
     "InvalidArgument", False),
    ("load refused", lambda renv, engine, b: renv.machine.fail_load_for.update(
        {b: KexecFailed("kexec_file_load: Cannot allocate memory")}), "KexecFailed", False),
    ("load leaves nothing loaded", lambda renv, engine, b:
     renv.machine.unloaded_after_load_for.add(b), "KexecFailed", True),
    ("recording the image", lambda renv, engine, b: save_staged_fails_for(engine, "b.efi"),
     "Failed", True),
    ("recording the plan", lambda renv, engine, b: _plan_save_fails_for_b(renv, engine),
     "Failed", True),
    ("a bug", lambda renv, engine, b: renv.machine.fail_prepare_for.update(
        {b: ZeroDivisionError("division by zero")}), "Failed", False),
]


@pytest.mark.parametrize(("what", "arrange", "error", "reloaded"), FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_failed_replacement_keeps_the_staged_image(renv, staged_a, what, arrange, error,
                                                    reloaded):
    engine, a, a_path = staged_a
    b_path = renv.image("b.efi")
    arrange(renv, engine, b_path)
    b = fail_b(renv, engine, b_path)
    a_is_still_staged(renv, engine, a, a_path)
    last = engine.last_error
    assert last["name"] == error and last["id"] == b and last["kept"] == a
    assert f"the staged image {a} stays staged" in last["message"]
    assert ("loaded again from its sealed copy" in last["message"]) is reloaded
    loads = [c for c in renv.machine.calls if c[0] == "load"]
    assert loads[-1] == ("load", a) if reloaded else loads[-1][1] in (a, b)
    assert ("unload",) not in renv.machine.calls       # never a moment with nothing loaded
    newest = engine.history()[0]
    assert newest["event"] == "stage-failed" and newest["id"] == b
    assert newest["detail"]["kept"] == a and newest["detail"]["error"] == error
    if renv.machine.staged[1:]:
        assert renv.machine.staged[1].closed == 1      # B's memfds are released


def test_successful_replacement_releases_the_old_image(renv, staged_a):
    engine, a, _ = staged_a
    b_path = renv.image("b.efi")
    b = engine.stage(b_path)
    assert engine.wait(5) == "staged"
    assert engine.staged_image["id"] == b and renv.machine.loaded_source == b_path
    assert renv.machine.staged[0].closed == 1 and renv.machine.staged[1].closed == 0
    assert engine.history()[0]["detail"]["replaced"] == a


def test_staged_image_stays_visible_while_the_replacement_stages(renv, staged_a):
    engine, a, _ = staged_a
    renv.machine.release_prepare.clear()
    renv.machine.in_prepare.clear()
    engine.stage(renv.image("b.efi"))
    assert renv.machine.in_prepare.wait(5)
    assert engine.state == "staging" and engine.staged_image["id"] == a
    assert engine.can_relaunch == "no"
    renv.machine.release_prepare.set()
    assert engine.wait(5) == "staged"


def test_cancel_during_prepare_keeps_the_staged_image(renv, staged_a):
    engine, a, a_path = staged_a
    renv.machine.release_prepare.clear()
    renv.machine.in_prepare.clear()
    b = engine.stage(renv.image("b.efi"))
    assert renv.machine.in_prepare.wait(5)
    engine.cancel()
    assert engine.wait(5) == "staged"
    a_is_still_staged(renv, engine, a, a_path)
    assert engine.last_error == {}
    newest = engine.history()[0]
    assert newest["event"] == "cancelled" and newest["id"] == b
    assert newest["detail"]["kept"] == a


def test_cancel_after_the_new_image_was_loaded_loads_the_old_again(renv, staged_a):
    engine, a, a_path = staged_a
    renv.machine.release_load.clear()
    renv.machine.in_load.clear()
    engine.stage(renv.image("b.efi"))
    assert renv.machine.in_load.wait(5)
    engine.cancel()                       # B's load completes, then the cancel is seen
    renv.machine.release_load.set()
    assert engine.wait(5) == "staged"
    a_is_still_staged(renv, engine, a, a_path)
    assert [c for c in renv.machine.calls if c[0] == "load"][-1] == ("load", a)


def test_location_refused_before_the_worker(renv, staged_a, tmp_path):
    engine, a, a_path = staged_a
    outside = tmp_path / "elsewhere.efi"
    outside.write_bytes(b"MZ")
    with pytest.raises(InvalidImage):
        engine.stage(str(outside))
    a_is_still_staged(renv, engine, a, a_path)


def test_old_image_lost_only_when_it_cannot_be_loaded_again(renv, staged_a):
    """B replaced A in the kernel and then failed; loading A again fails too: nothing is
    left loaded or recorded, and LastError says A was lost."""
    engine, a, a_path = staged_a
    b_path = renv.image("b.efi")
    renv.machine.unloaded_after_load_for.add(b_path)
    renv.machine.fail_load_for[a_path] = KexecFailed("kexec_file_load: Cannot allocate memory")
    b = fail_b(renv, engine, b_path)
    assert engine.state == "failed" and engine.staged_image == {}
    assert renv.machine.loaded is False
    assert not renv.staged_json.exists() and not renv.quiesce_plan_json.exists()
    last = engine.last_error
    assert last["id"] == b and last["lost"] == a and "kept" not in last
    assert f"the previously staged image {a} was lost too" in last["message"]
    assert renv.machine.staged[0].closed == 1
    assert engine.history()[0]["detail"]["lost"] == a


def test_after_a_restart_a_refused_load_still_keeps_the_image(renv, staged_a):
    """A daemon restarted while A was staged has no memfds of A: a load the kernel refused
    left A loaded (nothing to reload); a new image that replaced A cannot be undone."""
    engine, a, a_path = staged_a
    engine.close()
    engine = renv.engine()                 # reconciled: A staged, no memfds
    assert engine.state == "staged" and engine.staged is None
    b_path = renv.image("b.efi")
    renv.machine.fail_load_for[b_path] = KexecFailed("kexec_file_load: Invalid argument")
    fail_b(renv, engine, b_path)
    assert engine.state == "staged" and engine.staged_image["id"] == a
    assert renv.machine.loaded_source == a_path

    c_path = renv.image("c.efi")
    save_staged_fails_for(engine, "c.efi")
    fail_b(renv, engine, c_path)
    assert engine.state == "failed" and engine.last_error["lost"] == a
    assert "did not survive the daemon's restart" in engine.last_error["message"]
    assert renv.machine.loaded is False


def test_relaunch_into_the_kept_image_after_a_failed_replacement(renv, staged_a):
    engine, a, _ = staged_a
    b_path = renv.image("b.efi")
    renv.machine.fail_prepare_for[b_path] = VerificationFailed("b.efi: untrusted signer")
    fail_b(renv, engine, b_path)
    assert engine.relaunch() == a


def test_no_record_names_the_old_image_while_the_kernel_may_hold_the_new_one(renv, staged_a):
    """A daemon killed during the load must not restart believing the old image is loaded
    when the kernel may hold the new one: from the load on, staged.json is absent (and
    reconcile unloads an unrecorded image), until one of them is recorded again."""
    engine, a, a_path = staged_a
    renv.machine.release_load.clear()
    renv.machine.in_load.clear()
    b = engine.stage(renv.image("b.efi"))
    assert renv.machine.in_load.wait(5)
    assert not renv.staged_json.exists()
    assert engine.staged_image["id"] == a          # still what is shown meanwhile
    renv.machine.release_load.set()
    assert engine.wait(5) == "staged"
    assert json.loads(renv.staged_json.read_text())["id"] == b
