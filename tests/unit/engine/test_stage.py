"""Staging (relaunchd.engine.stage) over the FakeMachine: the options built from the request
and the configuration, requests refused before any work, failures and cancellation that
leave nothing loaded or recorded, restaging, and the staged record."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.engine.config import BootEntriesConfig, Config, TrustConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    InvalidArgument,
    InvalidBootEntry,
    InvalidImage,
    KexecFailed,
    NoBootEntry,
    NotStaged,
    VerificationFailed,
)
from support import bootfixtures, ukibuild
from support.engine_env import (
    PROPERTIES,
    EngineEnv,
    make_config,
    staged_engine,
)
from support.fakes import FakeMachine, FakeStaged, make_report


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
    # first, so a failing replacement cannot lose it (the replacement tests below).
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
    a_path = renv.make_image("a.efi")
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
    b_path = renv.make_image("b.efi")
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
    b_path = renv.make_image("b.efi")
    b = engine.stage(b_path)
    assert engine.wait(5) == "staged"
    assert engine.staged_image["id"] == b and renv.machine.loaded_source == b_path
    assert renv.machine.staged[0].closed == 1 and renv.machine.staged[1].closed == 0
    assert engine.history()[0]["detail"]["replaced"] == a


def test_staged_image_stays_visible_while_the_replacement_stages(renv, staged_a):
    engine, a, _ = staged_a
    renv.machine.release_prepare.clear()
    renv.machine.in_prepare.clear()
    engine.stage(renv.make_image("b.efi"))
    assert renv.machine.in_prepare.wait(5)
    assert engine.state == "staging" and engine.staged_image["id"] == a
    assert engine.can_relaunch == "no"
    renv.machine.release_prepare.set()
    assert engine.wait(5) == "staged"


def test_cancel_during_prepare_keeps_the_staged_image(renv, staged_a):
    engine, a, a_path = staged_a
    renv.machine.release_prepare.clear()
    renv.machine.in_prepare.clear()
    b = engine.stage(renv.make_image("b.efi"))
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
    engine.stage(renv.make_image("b.efi"))
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
    b_path = renv.make_image("b.efi")
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
    b_path = renv.make_image("b.efi")
    renv.machine.fail_load_for[b_path] = KexecFailed("kexec_file_load: Invalid argument")
    fail_b(renv, engine, b_path)
    assert engine.state == "staged" and engine.staged_image["id"] == a
    assert renv.machine.loaded_source == a_path

    c_path = renv.make_image("c.efi")
    save_staged_fails_for(engine, "c.efi")
    fail_b(renv, engine, c_path)
    assert engine.state == "failed" and engine.last_error["lost"] == a
    assert "did not survive the daemon's restart" in engine.last_error["message"]
    assert renv.machine.loaded is False


def test_relaunch_into_the_kept_image_after_a_failed_replacement(renv, staged_a):
    engine, a, _ = staged_a
    b_path = renv.make_image("b.efi")
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
    b = engine.stage(renv.make_image("b.efi"))
    assert renv.machine.in_load.wait(5)
    assert not renv.staged_json.exists()
    assert engine.staged_image["id"] == a          # still what is shown meanwhile
    renv.machine.release_load.set()
    assert engine.wait(5) == "staged"
    assert json.loads(renv.staged_json.read_text())["id"] == b


# ------------------------------------------------------------------
# staging a boot loader entry (issue 15)

TOKEN = "0123456789abcdef0123456789abcdef"
NEWER = f"{TOKEN}-6.1.0-15-amd64"        # kernel-install's TOKEN-KVER of each entry
OLDER = f"{TOKEN}-6.1.0-13-amd64"
UKI = "debian-uki.efi"


def type1(esp: Path, kver: str, *, options: str = "root=/dev/vda ro", extra: str = "") -> str:
    """An entry as kernel-install's 90-loaderentry.install writes it."""
    directory = esp / TOKEN / kver
    directory.mkdir(parents=True)
    (directory / "linux").write_bytes(b"MZ stand-in kernel")
    (directory / "initrd.img").write_bytes(b"initrd")
    name = f"{TOKEN}-{kver}.conf"
    (esp / "loader" / "entries" / name).write_text(
        f"title Debian GNU/Linux 12 (bookworm)\nversion {kver}\nmachine-id {TOKEN}\n"
        f"sort-key debian\noptions {options}\nlinux /{TOKEN}/{kver}/linux\n"
        f"initrd /{TOKEN}/{kver}/initrd.img\n{extra}")
    return name


@dataclasses.dataclass
class Env:
    tmp: Path
    root: Path
    esp: Path
    config: Config
    machine: FakeMachine

    def engine(self, **changes) -> Engine:
        return Engine(dataclasses.replace(self.config, **changes), self.machine)

    def staged(self, engine: Engine, **kw) -> dict:
        engine.stage("", **kw)
        assert engine.wait(5) == "staged", engine.last_error
        return engine.staged_image


@pytest.fixture
def eenv(tmp_path, keys) -> Env:
    root = tmp_path / "root"
    esp = root / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    type1(esp, "6.1.0-13-amd64")
    type1(esp, "6.1.0-15-amd64", options="root=/dev/vda ro quiet")
    bootfixtures.build_uki({"osrel": "ID=aaa\nPRETTY_NAME=UKI\nVERSION_ID=1\n",
                            "cmdline": "root=/dev/vda uki", "uname": "6.1.0-20-amd64"},
                           esp / "EFI" / "Linux" / UKI)
    machine = FakeMachine()
    machine.boot_root = str(root)
    config = Config(root=str(root), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(esp),),
                    boot_entries=BootEntriesConfig(esp="/efi"),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),),
                                      allow_unsigned_initrd=True))
    return Env(tmp_path, root, esp, config, machine)


def test_next_boot_is_the_loaders_first_entry_and_the_record_names_it(eenv):
    # Sort key "aaa" < "debian": the UKI is first; then the newer kernel.
    (eenv.esp / "EFI" / "Linux" / UKI).unlink()
    engine = eenv.engine()
    image = eenv.staged(engine, entry="next-boot", append=("quiet",))
    name = f"{NEWER}.conf"
    assert eenv.machine.calls[0] == ("prepare_entry", name)
    assert eenv.machine.entry_options == [{"allow_unsigned_parts": True}]
    assert image["path"] == f"/efi/loader/entries/{name}"
    assert image["entry"]["id"] == name and image["entry"]["stem"] == NEWER
    assert image["entry"]["type"] == "type1" and image["entry"]["version"] == "6.1.0-15-amd64"
    assert image["entry"]["kernel"] == f"/efi/{TOKEN}/6.1.0-15-amd64/linux"
    assert image["signed"] == ["kernel"] and image["unsigned"] == ["initrd", "options"]
    # The staged command line is the entry's options plus what staging adds.
    relaunch_id = image["id"]
    assert image["cmdline"] == f"root=/dev/vda ro quiet quiet relaunchd.id={relaunch_id}"
    record = json.loads((Path(eenv.config.runtime_dir) / state.STAGED).read_text())
    assert record["entry"]["id"] == name and record["signed"] == ["kernel"]
    assert set(record["digests"]) == {"kernel", "initrd", "cmdline"}     # measured as a UKI's
    event = engine.history()[0]
    assert event["event"] == "staged" and event["detail"]["entry"] == name
    # The record survives a daemon restart as it was.
    assert Engine(eenv.config, eenv.machine).staged_image == image


def test_a_uki_entry_is_signed_as_a_whole(eenv):
    image = eenv.staged(eenv.engine(), entry="next-boot")
    assert image["entry"]["id"] == UKI and image["entry"]["type"] == "type2"
    assert image["signed"] == ["image"] and image["unsigned"] == []
    assert image["path"] == f"/efi/EFI/Linux/{UKI}"


def test_an_entry_by_id_or_kernel_install_name(eenv):
    engine = eenv.engine()
    assert eenv.staged(engine, entry=OLDER.upper())["entry"]["id"] == f"{OLDER}.conf"
    assert eenv.staged(engine, entry=f"{NEWER}.conf")["entry"]["id"] == f"{NEWER}.conf"
    with pytest.raises(NoBootEntry, match="no-such"):
        engine.stage("", entry="no-such")
    assert engine.state == "staged"            # a refusal changes nothing


def test_the_oneshot_variable_changes_what_next_boot_stages(eenv):
    bootfixtures.set_efivars(eenv.root, {"LoaderEntryOneShot": f"{OLDER}.conf"})
    assert eenv.staged(eenv.engine(), entry="next-boot")["entry"]["id"] == f"{OLDER}.conf"


def test_unsigned_parts_are_refused_unless_allowed(eenv):
    engine = eenv.engine(trust=dataclasses.replace(eenv.config.trust,
                                                  allow_unsigned_initrd=False))
    with pytest.raises(VerificationFailed) as info:
        engine.stage("", entry=NEWER)
    assert "trust.allow_unsigned_initrd" in str(info.value)
    assert "initrd and options" in str(info.value)
    assert engine.state == "idle" and eenv.machine.calls == []
    # A UKI needs no such permission: everything in it is signed.
    assert eenv.staged(engine, entry=UKI)["entry"]["id"] == UKI


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"entry": "next-boot", "path": "/efi/x.efi"}, InvalidArgument, "not both"),
    ({"entry": "next-boot", "cmdline": "x"}, InvalidArgument, "options are the command line"),
    ({"entry": "next-boot", "profile": 1}, InvalidArgument, "profile"),
    ({"entry": ""}, InvalidArgument, "entry must be"),
    ({"if_auto_stage": True, "path": "/efi/x.efi"}, InvalidArgument, "if_auto_stage"),
])
def test_bad_requests_are_refused_before_any_work(eenv, kwargs, error, words):
    engine = eenv.engine()
    path = kwargs.pop("path", "")
    with pytest.raises(error, match=words):
        engine.stage(path, **kwargs)
    assert engine.state == "idle" and eenv.machine.calls == []


def test_entries_relaunchd_cannot_stage_are_refused_with_every_reason(eenv):
    (eenv.esp / TOKEN / "6.1.0-15-amd64" / "initrd.img").unlink()
    engine = eenv.engine()
    with pytest.raises(InvalidBootEntry, match="initrd-missing"):
        engine.stage("", entry=NEWER)
    type1(eenv.esp, "6.1.0-16-amd64", extra="devicetree /dtb\n")
    (eenv.esp / "dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    with pytest.raises(InvalidBootEntry, match="device tree"):
        engine.stage("", entry=f"{TOKEN}-6.1.0-16-amd64")
    assert engine.state == "idle" and eenv.machine.calls == []


def test_a_uki_entry_outside_the_image_directories_is_refused(eenv, tmp_path):
    engine = eenv.engine(image_dirs=(str(tmp_path / "elsewhere"),))
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        engine.stage("", entry=UKI)
    assert eenv.machine.calls == []


def test_no_entries_at_all(eenv, tmp_path):
    empty = tmp_path / "empty"
    (empty / "efi").mkdir(parents=True)
    eenv.machine.boot_root = str(empty)
    with pytest.raises(NoBootEntry, match="no boot loader entry would boot next"):
        eenv.engine(root=str(empty)).stage("", entry="next-boot")


def test_if_auto_stage_stages_only_when_configured(eenv):
    engine = eenv.engine()
    assert engine.config.auto_stage == "off"
    assert engine.stage("", entry="next-boot", if_auto_stage=True) == ""
    assert engine.state == "idle" and eenv.machine.calls == [] and engine.history() == []
    engine = eenv.engine(auto_stage="next-boot")
    relaunch_id = engine.stage("", entry="next-boot", if_auto_stage=True)
    assert relaunch_id and engine.wait(5) == "staged"
    assert engine.staged_image["entry"]["id"] == UKI


def staged_with(eenv: Env, entry: str) -> Engine:
    engine = eenv.engine()
    eenv.staged(engine, entry=entry)
    return engine


@pytest.mark.parametrize(("if_entry", "if_kernel"), [
    (NEWER, None),                              # kernel-install's TOKEN-KVER
    (f"{NEWER}.CONF", None),                    # the loader's id, any case
    (None, "6.1.0-15-amd64"),                   # a Type #1 entry's version
    ("something-else", "6.1.0-15-amd64"),       # either one
])
def test_cancel_if_the_staged_entry_matches(eenv, if_entry, if_kernel):
    engine = staged_with(eenv, NEWER)
    engine.cancel(if_entry=if_entry, if_kernel=if_kernel)
    assert engine.state == "idle" and eenv.machine.calls[-1] == ("unload",)
    assert engine.history()[0]["event"] == "unstaged"


@pytest.mark.parametrize(("if_entry", "if_kernel"), [
    (OLDER, None), (None, "6.1.0-13-amd64"), (OLDER, "6.1.0-13-amd64")])
def test_cancel_of_another_entry_leaves_the_stage_alone(eenv, if_entry, if_kernel):
    engine = staged_with(eenv, NEWER)
    with pytest.raises(NotStaged, match="nothing from"):
        engine.cancel(if_entry=if_entry, if_kernel=if_kernel)
    assert engine.state == "staged" and ("unload",) not in eenv.machine.calls


def test_a_uki_entry_matches_by_its_uname(eenv):
    engine = staged_with(eenv, UKI)
    with pytest.raises(NotStaged):
        engine.cancel(if_kernel="6.1.0-15-amd64")
    engine.cancel(if_kernel="6.1.0-20-amd64")
    assert engine.state == "idle"


def test_filtered_cancel_never_touches_an_image_staged_by_path(eenv):
    engine = eenv.engine()
    engine.stage(str(eenv.esp / "EFI" / "Linux" / UKI))
    assert engine.wait(5) == "staged"
    with pytest.raises(NotStaged):
        engine.cancel(if_entry=UKI)
    assert engine.state == "staged"
    engine.cancel()
    with pytest.raises(NotStaged, match="nothing is staged"):
        engine.cancel(if_entry=UKI)


def test_filtered_cancel_while_the_entry_is_being_staged(eenv):
    eenv.machine.release_prepare.clear()
    engine = eenv.engine()
    engine.stage("", entry=NEWER)
    assert eenv.machine.in_prepare.wait(5)
    with pytest.raises(NotStaged):
        engine.cancel(if_entry=OLDER)
    assert engine.state == "staging"
    engine.cancel(if_kernel="6.1.0-15-amd64")
    eenv.machine.release_prepare.set()
    assert engine.wait(5) == "idle"
    assert engine.history()[0]["event"] == "cancelled"


def test_list_images_has_the_loader_and_every_entry_with_its_verdict(eenv):
    items = eenv.engine().list_images()
    kinds = [i["kind"] for i in items]
    assert kinds == ["image", "boot-loader", "boot-entry", "boot-entry", "boot-entry"]
    loader = items[1]
    assert loader["esp"] == "/efi" and loader["next_boot"] == UKI
    assert loader["next_boot_reason"] == "first entry" and "entries" not in loader
    entries = items[2:]
    assert [e["id"] for e in entries] == [UKI, f"{NEWER}.conf", f"{OLDER}.conf"]
    assert [e["next_boot"] for e in entries] == [True, False, False]
    assert [e["default"] for e in entries] == [True, False, False]
    # Verified against the configured trust: none of these stand-ins is signed.
    assert all(e["verified"] is False for e in entries)
    assert all(e["stageable"] for e in entries)
    assert entries[1]["signed_parts"] == ["kernel"] and entries[0]["signed_parts"] == ["image"]
    json.dumps(items)


def test_list_images_without_boot_partitions_or_with_a_wrong_esp(eenv, tmp_path):
    eenv.machine.boot_root = None
    items = eenv.engine().list_images()
    assert [i["kind"] for i in items] == ["image", "boot-loader"]
    assert items[1]["esp"] is None and items[1]["notes"]
    eenv.machine.boot_root = str(eenv.root)
    items = eenv.engine(boot_entries=BootEntriesConfig(esp="/nope")).list_images()
    assert items[-1]["kind"] == "boot-loader"
    assert items[-1]["error"].startswith("InvalidArgument: ESP path '/nope'")


def test_list_images_verdict_of_a_signed_uki(eenv, keys, tmp_path):
    signed = ukibuild.sign(eenv.esp / "EFI" / "Linux" / UKI, keys["db"], tmp_path / "s.efi")
    (eenv.esp / "EFI" / "Linux" / UKI).write_bytes(signed.read_bytes())
    entry = next(i for i in eenv.engine().list_images() if i.get("id") == UKI)
    assert entry["verified"] is True and entry["verified_by"] == "CN=relaunchd test db"


def test_auto_stage_config_accepts_yaml_off():
    from relaunchd.engine.config_file import parse_config
    from relaunchd.errors import ConfigError

    assert parse_config("auto_stage: off\n").auto_stage == "off"
    assert parse_config("auto_stage: 'off'\n").auto_stage == "off"
    assert parse_config("auto_stage: next-boot\n").auto_stage == "next-boot"
    for bad in ("on", "true", "yes", "next_boot"):
        with pytest.raises(ConfigError, match="auto_stage: must be one of off, next-boot"):
            parse_config(f"auto_stage: {bad}\n")
    loaded = parse_config("boot_entries: {esp: /boot/efi, xbootldr: null}\n"
                          "trust: {allow_unsigned_initrd: true}\n")
    assert loaded.boot_entries == BootEntriesConfig(esp="/boot/efi", xbootldr=None)
    assert loaded.trust.allow_unsigned_initrd is True
    with pytest.raises(ConfigError, match="boot_entries.esp: must be an absolute path"):
        parse_config("boot_entries: {esp: efi}\n")
