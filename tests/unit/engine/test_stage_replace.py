"""A Stage that fails keeps the image staged before it (issue #14, item 10).

Image A is staged and loaded; a Stage of image B then fails at each point staging can fail
— verification, a bad file, the digests, the quiesce plan, the load, the load that leaves
nothing loaded, recording, a cancel, a bug — and A must still be loaded (the fake kernel
holds A's path), recorded (staged.json, the quiesce plan) and shown (State `staged`,
StagedImage), with LastError and history saying what happened. The fake machine
(tests/support/fakes.py) behaves as the kernel does: a load that fails changes nothing, one
that succeeds replaces what was loaded.
"""

from __future__ import annotations

import json

import pytest

from relaunchd.engine import state
from relaunchd.errors import (
    InvalidArgument,
    InvalidImage,
    KexecFailed,
    VerificationFailed,
)
from support.engine_env import EngineEnv


@pytest.fixture
def env(tmp_path, keys) -> EngineEnv:
    return EngineEnv.create(tmp_path, str(keys["db"].cert))


@pytest.fixture
def staged_a(env):
    engine = env.engine()
    a_path = env.image("a.efi")
    a = engine.stage(a_path)
    assert engine.wait(5) == "staged"
    return engine, a, a_path


def a_is_still_staged(env: EngineEnv, engine, a: str, a_path: str) -> None:
    assert engine.state == "staged" and engine.can_relaunch == "yes"
    assert engine.staged_image["id"] == a and engine.staged_image["path"] == a_path
    assert env.machine.loaded is True and env.machine.loaded_source == a_path
    assert json.loads(env.staged_json.read_text())["id"] == a
    assert json.loads(env.quiesce_plan_json.read_text())["id"] == a
    assert env.machine.staged[0].closed == 0            # A's memfds stay open


def fail_b(env: EngineEnv, engine, b_path: str):
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


def _plan_save_fails_for_b(env, engine):
    real = engine.store.save_runtime

    def save(name, value):
        if name == state.QUIESCE_PLAN and value["id"] != engine.record.id:
            raise OSError(28, "No space left on device")
        real(name, value)
    engine.store.save_runtime = save


# (what fails, how to make it fail, the error, was A loaded again from its memfds?)
FAILURES = [
    ("verification", lambda env, engine, b: env.machine.fail_prepare_for.update(
        {b: VerificationFailed("b.efi: the signature does not verify")}),
     "VerificationFailed", False),
    ("bad file", lambda env, engine, b: env.machine.fail_prepare_for.update(
        {b: InvalidImage("b.efi: not a PE file")}), "InvalidImage", False),
    ("digests", lambda env, engine, b: setattr(env.machine, "fail_digests",
                                               OSError(5, "Input/output error")),
     "Failed", False),
    ("quiesce plan", lambda env, engine, b: setattr(
        env.machine, "fail_quiesce_plan", InvalidArgument("no PCI device 0000:09:00.0")),
     "InvalidArgument", False),
    ("load refused", lambda env, engine, b: env.machine.fail_load_for.update(
        {b: KexecFailed("kexec_file_load: Cannot allocate memory")}), "KexecFailed", False),
    ("load leaves nothing loaded", lambda env, engine, b:
     env.machine.unloaded_after_load_for.add(b), "KexecFailed", True),
    ("recording the image", lambda env, engine, b: save_staged_fails_for(engine, "b.efi"),
     "Failed", True),
    ("recording the plan", lambda env, engine, b: _plan_save_fails_for_b(env, engine),
     "Failed", True),
    ("a bug", lambda env, engine, b: env.machine.fail_prepare_for.update(
        {b: ZeroDivisionError("division by zero")}), "Failed", False),
]


@pytest.mark.parametrize(("what", "arrange", "error", "reloaded"), FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_failed_replacement_keeps_the_staged_image(env, staged_a, what, arrange, error,
                                                    reloaded):
    engine, a, a_path = staged_a
    b_path = env.image("b.efi")
    arrange(env, engine, b_path)
    b = fail_b(env, engine, b_path)
    a_is_still_staged(env, engine, a, a_path)
    last = engine.last_error
    assert last["name"] == error and last["id"] == b and last["kept"] == a
    assert f"the staged image {a} stays staged" in last["message"]
    assert ("loaded again from its sealed copy" in last["message"]) is reloaded
    loads = [c for c in env.machine.calls if c[0] == "load"]
    assert loads[-1] == ("load", a) if reloaded else loads[-1][1] in (a, b)
    assert ("unload",) not in env.machine.calls       # never a moment with nothing loaded
    newest = engine.history()[0]
    assert newest["event"] == "stage-failed" and newest["id"] == b
    assert newest["detail"]["kept"] == a and newest["detail"]["error"] == error
    if env.machine.staged[1:]:
        assert env.machine.staged[1].closed == 1      # B's memfds are released


def test_successful_replacement_releases_the_old_image(env, staged_a):
    engine, a, _ = staged_a
    b_path = env.image("b.efi")
    b = engine.stage(b_path)
    assert engine.wait(5) == "staged"
    assert engine.staged_image["id"] == b and env.machine.loaded_source == b_path
    assert env.machine.staged[0].closed == 1 and env.machine.staged[1].closed == 0
    assert engine.history()[0]["detail"]["replaced"] == a


def test_staged_image_stays_visible_while_the_replacement_stages(env, staged_a):
    engine, a, _ = staged_a
    env.machine.release_prepare.clear()
    env.machine.in_prepare.clear()
    engine.stage(env.image("b.efi"))
    assert env.machine.in_prepare.wait(5)
    assert engine.state == "staging" and engine.staged_image["id"] == a
    assert engine.can_relaunch == "no"
    env.machine.release_prepare.set()
    assert engine.wait(5) == "staged"


def test_cancel_during_prepare_keeps_the_staged_image(env, staged_a):
    engine, a, a_path = staged_a
    env.machine.release_prepare.clear()
    env.machine.in_prepare.clear()
    b = engine.stage(env.image("b.efi"))
    assert env.machine.in_prepare.wait(5)
    engine.cancel()
    assert engine.wait(5) == "staged"
    a_is_still_staged(env, engine, a, a_path)
    assert engine.last_error == {}
    newest = engine.history()[0]
    assert newest["event"] == "cancelled" and newest["id"] == b
    assert newest["detail"]["kept"] == a


def test_cancel_after_the_new_image_was_loaded_loads_the_old_again(env, staged_a):
    engine, a, a_path = staged_a
    env.machine.release_load.clear()
    env.machine.in_load.clear()
    engine.stage(env.image("b.efi"))
    assert env.machine.in_load.wait(5)
    engine.cancel()                       # B's load completes, then the cancel is seen
    env.machine.release_load.set()
    assert engine.wait(5) == "staged"
    a_is_still_staged(env, engine, a, a_path)
    assert [c for c in env.machine.calls if c[0] == "load"][-1] == ("load", a)


def test_location_refused_before_the_worker(env, staged_a, tmp_path):
    engine, a, a_path = staged_a
    outside = tmp_path / "elsewhere.efi"
    outside.write_bytes(b"MZ")
    with pytest.raises(InvalidImage):
        engine.stage(str(outside))
    a_is_still_staged(env, engine, a, a_path)


def test_old_image_lost_only_when_it_cannot_be_loaded_again(env, staged_a):
    """B replaced A in the kernel and then failed; loading A again fails too: nothing is
    left loaded or recorded, and LastError says A was lost."""
    engine, a, a_path = staged_a
    b_path = env.image("b.efi")
    env.machine.unloaded_after_load_for.add(b_path)
    env.machine.fail_load_for[a_path] = KexecFailed("kexec_file_load: Cannot allocate memory")
    b = fail_b(env, engine, b_path)
    assert engine.state == "failed" and engine.staged_image == {}
    assert env.machine.loaded is False
    assert not env.staged_json.exists() and not env.quiesce_plan_json.exists()
    last = engine.last_error
    assert last["id"] == b and last["lost"] == a and "kept" not in last
    assert f"the previously staged image {a} was lost too" in last["message"]
    assert env.machine.staged[0].closed == 1
    assert engine.history()[0]["detail"]["lost"] == a


def test_after_a_restart_a_refused_load_still_keeps_the_image(env, staged_a):
    """A daemon restarted while A was staged has no memfds of A: a load the kernel refused
    left A loaded (nothing to reload); a new image that replaced A cannot be undone."""
    engine, a, a_path = staged_a
    engine.close()
    engine = env.engine()                 # reconciled: A staged, no memfds
    assert engine.state == "staged" and engine.staged is None
    b_path = env.image("b.efi")
    env.machine.fail_load_for[b_path] = KexecFailed("kexec_file_load: Invalid argument")
    fail_b(env, engine, b_path)
    assert engine.state == "staged" and engine.staged_image["id"] == a
    assert env.machine.loaded_source == a_path

    c_path = env.image("c.efi")
    save_staged_fails_for(engine, "c.efi")
    fail_b(env, engine, c_path)
    assert engine.state == "failed" and engine.last_error["lost"] == a
    assert "did not survive the daemon's restart" in engine.last_error["message"]
    assert env.machine.loaded is False


def test_relaunch_into_the_kept_image_after_a_failed_replacement(env, staged_a):
    engine, a, _ = staged_a
    b_path = env.image("b.efi")
    env.machine.fail_prepare_for[b_path] = VerificationFailed("b.efi: untrusted signer")
    fail_b(env, engine, b_path)
    assert engine.relaunch() == a


def test_no_record_names_the_old_image_while_the_kernel_may_hold_the_new_one(env, staged_a):
    """A daemon killed during the load must not restart believing the old image is loaded
    when the kernel may hold the new one: from the load on, staged.json is absent (and
    reconcile unloads an unrecorded image), until one of them is recorded again."""
    engine, a, a_path = staged_a
    env.machine.release_load.clear()
    env.machine.in_load.clear()
    b = engine.stage(env.image("b.efi"))
    assert env.machine.in_load.wait(5)
    assert not env.staged_json.exists()
    assert engine.staged_image["id"] == a          # still what is shown meanwhile
    env.machine.release_load.set()
    assert engine.wait(5) == "staged"
    assert json.loads(env.staged_json.read_text())["id"] == b
