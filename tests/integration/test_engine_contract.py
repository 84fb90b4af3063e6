"""The bus tests' fake engine (tests/support/dbus_fake_engine.py) held to the real one
(relaunchd.engine.core.Engine over the in-memory FakeMachine): the same assertions against
both — the property set and shapes (everything the bus publishes, as D-Bus variants),
states from `core.STATES`, history newest first as `{time, event, id, detail}`, `check()`,
`list_images()` and `inspect()` entries, and the named errors the bus maps.

The fake's deliberate differences are listed in its docstring (it does not verify, load,
measure or prove); they are outside what is compared here. Two places where the real
engine disagreed with its documentation or its CLI (Cancel returning before the stage had
stopped; ListImages without the `staged` flag the CLI marks by) were found here and fixed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gi.repository import Gio

from relaunchd.bus.names import INTERFACE, introspection_xml
from relaunchd.bus.service import PROPERTY_OF
from relaunchd.bus.variants import property_variant, to_vardict
from relaunchd.engine import core
from relaunchd.engine.config import Config, TrustConfig
from relaunchd.errors import Busy, InvalidArgument, InvalidImage, NotStaged, VerificationFailed
from relaunchd.launch import registry
from support import dbus_fake_engine, ukibuild
from support.fakes import FakeMachine, make_report
from support.machine_contract import IMAGE_ENTRY_KEYS

STAGED_KEYS = {"id", "path", "method", "loader", "kernel_sha256", "initrd_sha256", "cmdline",
               "staged_at", "quiesce"}
PROGRESS_KEYS = {"step", "done", "total", "percent"}
HISTORY_KEYS = {"time", "event", "id", "detail"}
ERROR_KEYS = {"name", "message", "time"}
STAGE_ERROR_KEYS = ERROR_KEYS | {"id"}      # a failed stage names its relaunch id
CHECK_KEYS = {"root", "best", "methods", "facts", "method", "ready"}
REHEARSAL_KEYS = {"ok", "quiesced_ok", "restored_ok", "mismatches", "executed", "rollback"}


@dataclass
class Subject:
    """One engine under test, with the knobs the contract needs to hold staging or make
    it fail (each engine has its own way; the assertions are the same)."""

    kind: str
    engine: Any
    images: Path
    notes: list[set[str]]
    hold: Any
    release: Any
    fail_next: Any

    def stage_and_wait(self, name: str = "a.efi") -> str:
        ident = self.engine.stage(str(self.images / name))
        assert self.engine.wait(30) == "staged", self.engine.last_error
        return ident


def _images(tmp_path: Path, small_uki: bytes) -> Path:
    d = tmp_path / "images"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    (d / "a.efi").write_bytes(os.urandom(3 << 20))     # not a UKI: the catalogue says why
    (d / "uki.efi").write_bytes(small_uki)
    return d


def _fake(tmp_path: Path, images: Path, notes: list) -> Subject:
    for sub in ("state", "run"):
        (tmp_path / sub).mkdir()
    config = dbus_fake_engine.Config(root="/", state_dir=str(tmp_path / "state"),
                                     runtime_dir=str(tmp_path / "run"),
                                     image_dirs=(str(images),))
    engine = dbus_fake_engine.Engine(config, notify=notes.append)

    def hold() -> None:
        engine.config = dataclasses.replace(engine.config, chunk_delay=0.2)

    def release() -> None:
        engine.config = dataclasses.replace(engine.config, chunk_delay=0.0)

    def fail_next() -> str:
        (images / "bad.efi").write_bytes(b"MZ" + bytes(100))
        return "bad.efi"

    return Subject("fake", engine, images, notes, hold, release, fail_next)


def _real(tmp_path: Path, images: Path, notes: list, cert: str) -> Subject:
    (tmp_path / "platform").mkdir()
    config = Config(root=str(tmp_path / "platform"), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(images),),
                    trust=TrustConfig(certificates=(cert,)))
    machine = FakeMachine(report=make_report(ready={"kexec"}))
    engine = core.Engine(config, machine, notify=notes.append)

    def fail_next() -> str:
        machine.fail_prepare = VerificationFailed("signature does not verify")
        return "a.efi"

    return Subject("real", engine, images, notes, machine.release_prepare.clear,
                   machine.release_prepare.set, fail_next)


@pytest.fixture(scope="module")
def small_uki(tmp_path_factory) -> bytes:
    return ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b'PRETTY_NAME="Contract"\nID=contract\n'), (".uname", b"6.1.0-c"),
        (".linux", b"MZ" + bytes(4096)),
    ]), tmp_path_factory.mktemp("uki") / "uki.efi").read_bytes()


@pytest.fixture(params=["fake", "real"])
def subject(request, tmp_path, small_uki, keys):
    images = _images(tmp_path, small_uki)
    notes: list[set[str]] = []
    made = (_fake(tmp_path, images, notes) if request.param == "fake"
            else _real(tmp_path, images, notes, str(keys["db"].cert)))
    yield made
    made.release()
    made.engine.close()


def _signatures() -> dict[str, str]:
    node = Gio.DBusNodeInfo.new_for_xml(introspection_xml())
    return {p.name: p.signature for p in node.lookup_interface(INTERFACE).properties}


def assert_published(engine) -> None:
    """Every property the bus publishes: readable, JSON-able, and a variant of the
    signature the shipped XML declares."""
    signatures = _signatures()
    assert set(PROPERTY_OF) == set(core.PROPERTIES)
    assert set(PROPERTY_OF.values()) == set(signatures)
    for name, dbus_name in PROPERTY_OF.items():
        value = getattr(engine, name)
        json.dumps(value)
        assert property_variant(signatures[dbus_name], value).get_type_string() \
            == signatures[dbus_name]


def assert_progress(progress: dict) -> None:
    assert set(progress) == PROGRESS_KEYS
    assert isinstance(progress["step"], str) and 0 <= progress["percent"] <= 100
    assert all(isinstance(progress[k], int) for k in ("done", "total", "percent"))


def assert_history(entries: list[dict], events: list[str]) -> None:
    assert [e["event"] for e in entries] == events
    times = []
    for entry in entries:
        assert set(entry) == HISTORY_KEYS
        assert isinstance(entry["detail"], dict)
        times.append(datetime.datetime.fromisoformat(entry["time"]))
    assert times == sorted(times, reverse=True)          # newest first
    for entry in entries:
        to_vardict(entry)                                # what GetHistory sends


# ------------------------------------------------------------------ properties

def test_properties_when_idle(subject):
    engine = subject.engine
    assert_published(engine)
    assert engine.state == "idle" and engine.state in core.STATES
    assert engine.progress == {"step": "", "done": 0, "total": 0, "percent": 0}
    assert engine.staged_image == {} and engine.last_error == {}
    assert engine.last_relaunch == {}
    assert engine.can_relaunch == "no"
    assert isinstance(engine.version, str) and engine.version
    caps = engine.capabilities
    assert set(caps) == {*registry.NAMES, "best", "volumes"}
    assert caps["volumes"] == []          # the fixture root has no /etc/crypttab
    for method in registry.NAMES:
        assert set(caps[method]) == {"ready", "reasons"}
        assert isinstance(caps[method]["ready"], bool)
        assert all(isinstance(r, str) for r in caps[method]["reasons"])
    assert caps["best"] == "kexec"
    caps["best"] = "mutated"
    assert engine.capabilities["best"] == "kexec"        # a copy, not the engine's own


def test_stage_to_staged(subject):
    engine = subject.engine
    ident = engine.stage(str(subject.images / "a.efi"), append=["quiet"])
    assert isinstance(ident, str) and ident
    assert engine.wait(30) == "staged"
    assert_published(engine)
    image = engine.staged_image
    assert set(image) == STAGED_KEYS
    assert image["id"] == ident and image["path"] == str(subject.images / "a.efi")
    assert image["method"] == "kexec" and image["loader"] == "file"
    # (what the command line holds is staging's: FakeMachine keeps a fixed one)
    assert isinstance(image["cmdline"], str) and image["cmdline"]
    assert engine.can_relaunch == "yes"
    assert_progress(engine.progress)
    assert engine.progress["percent"] == 100
    seen = set().union(*subject.notes)
    assert {"state", "progress", "staged_image", "can_relaunch"} <= seen <= set(core.PROPERTIES)
    assert_history(engine.history(), ["staged"])
    assert engine.history()[0]["id"] == ident


def test_a_second_stage_while_staging_is_busy_and_cancel_ends_it(subject):
    engine = subject.engine
    subject.hold()
    ident = engine.stage(str(subject.images / "a.efi"))
    assert engine.state == "staging"
    assert_progress(engine.progress)
    with pytest.raises(Busy):
        engine.stage(str(subject.images / "a.efi"))
    with pytest.raises(Busy):
        engine.relaunch()
    engine.cancel()                      # asks; the stage ends in idle soon after
    subject.release()
    assert engine.wait(30) == "idle"
    assert engine.staged_image == {} and engine.last_error == {}
    assert_history(engine.history(), ["cancelled"])
    assert engine.history()[0]["id"] == ident


def test_cancel_staged_unloads(subject):
    engine = subject.engine
    ident = subject.stage_and_wait()
    engine.cancel()
    assert engine.state == "idle" and engine.staged_image == {}
    assert engine.can_relaunch == "no"
    assert_history(engine.history(), ["unstaged", "staged"])
    assert {e["id"] for e in engine.history()} == {ident}


def test_restage_and_history_limit(subject):
    engine = subject.engine
    first = subject.stage_and_wait()
    engine.cancel()
    second = subject.stage_and_wait()
    assert second != first and engine.staged_image["id"] == second
    assert_history(engine.history(), ["staged", "unstaged", "staged"])
    assert [e["id"] for e in engine.history(limit=1)] == [second]
    assert engine.history(0) == []
    with pytest.raises(InvalidArgument):
        engine.history(-1)


def test_a_failed_stage(subject):
    engine = subject.engine
    name = subject.fail_next()
    ident = engine.stage(str(subject.images / name))
    assert engine.wait(30) == "failed"
    error = engine.last_error
    assert set(error) == STAGE_ERROR_KEYS and error["name"] == "VerificationFailed"
    assert error["id"] == ident
    datetime.datetime.fromisoformat(error["time"])
    assert engine.staged_image == {} and engine.can_relaunch == "no"
    assert_history(engine.history(), ["stage-failed"])
    assert engine.history()[0]["id"] == ident
    with pytest.raises(NotStaged):
        engine.cancel()                 # failed is not staged
    assert_published(engine)


# ------------------------------------------------------------------ errors the bus maps

def test_not_staged_when_idle(subject):
    engine = subject.engine
    for call in (engine.cancel, engine.relaunch, engine.rehearse):
        with pytest.raises(NotStaged):
            call()
    assert engine.state == "idle" and engine.history() == []


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"path": "relative.efi"}, InvalidArgument),
    ({"method": "grub"}, InvalidArgument),
    ({"loader": "magic"}, InvalidArgument),
    ({"profile": -1}, InvalidArgument),
    ({"append": "quiet"}, InvalidArgument),
    ({"path": "/etc/passwd"}, InvalidImage),
    ({"path": "/nonexistent/x.efi"}, InvalidImage),
])
def test_stage_refused_before_any_work(subject, kwargs, error):
    engine = subject.engine
    kwargs = dict(kwargs)               # the parameters are shared by both subjects
    path = kwargs.pop("path", str(subject.images / "a.efi"))
    with pytest.raises(error):
        engine.stage(path, **kwargs)
    assert engine.state == "idle" and engine.last_error == {} and engine.history() == []


def test_check(subject):
    engine = subject.engine
    result = engine.check()
    assert set(result) == CHECK_KEYS
    assert result["method"] == "auto" and result["ready"] is True
    assert result["best"] == "kexec"
    assert set(result["methods"]) == set(registry.NAMES)
    for verdict in result["methods"].values():
        assert set(verdict) == {"ready", "reasons", "checks"}
        assert all(set(r) == {"id", "message", "remedy"} for r in verdict["reasons"])
        assert all(set(c) == {"id", "message", "remedy", "ok"} for c in verdict["checks"])
    for fact in result["facts"].values():
        assert {"value", "source"} <= set(fact) <= {"value", "source", "error", "detail"}
    txt = engine.check("txt")
    assert txt["method"] == "txt" and txt["ready"] is False
    with pytest.raises(InvalidArgument):
        engine.check("grub")
    to_vardict(result)


def test_list_images(subject):
    listed = [e for e in subject.engine.list_images() if e["kind"] == "image"]
    by_name = {Path(e["path"]).name: e for e in listed}
    assert list(by_name) == ["a.efi", "uki.efi"]
    assert set(by_name["uki.efi"]) == IMAGE_ENTRY_KEYS | {"staged", "kind"}
    assert by_name["uki.efi"]["title"] == "Contract" and by_name["uki.efi"]["signed"] is False
    assert not any(e["staged"] for e in listed)           # nothing is staged yet
    assert "not a PE image" in by_name["a.efi"]["error"]
    for entry in listed:
        to_vardict(entry)                                # what ListImages sends


def test_inspect(subject):
    engine = subject.engine
    report = engine.inspect(str(subject.images / "uki.efi"))
    assert report["uname"] == "6.1.0-c" and report["signature"]["signed"] is False
    assert {"sections", "pcr11", "os_release", "warnings"} <= set(report)
    with pytest.raises(InvalidImage, match="no such file"):
        engine.inspect(str(subject.images / "missing.efi"))
    with pytest.raises(InvalidArgument, match="profile 3"):
        engine.inspect(str(subject.images / "uki.efi"), profile=3)


# ------------------------------------------------------------------ relaunch

def test_relaunch(subject):
    engine = subject.engine
    ident = subject.stage_and_wait()
    assert engine.relaunch(force=True) == ident
    assert engine.state in ("quiescing", "relaunching")
    assert engine.can_relaunch == "no"
    assert engine.staged_image["id"] == ident          # still loaded while going down
    entry = engine.history()[0]
    assert entry["event"] == "relaunch-started" and entry["id"] == ident
    assert entry["detail"]["force"] is True
    with pytest.raises(Busy):
        engine.stage(str(subject.images / "a.efi"))
    with pytest.raises(Busy):
        engine.cancel()
    assert_published(engine)


def test_rehearse(subject):
    engine = subject.engine
    ident = subject.stage_and_wait()
    report = engine.rehearse()
    assert set(report) == REHEARSAL_KEYS and report["ok"] is True
    assert set(report["rollback"]) == {"restored", "already", "failed", "notes"}
    assert engine.state == "staged" and engine.staged_image["id"] == ident
    assert engine.history()[0]["event"] == "rehearsed"
    to_vardict(report)


# ------------------------------------------------------------------ known disagreements

def test_the_real_cancel_during_staging_leaves_state_idle_as_documented(tmp_path, small_uki,
                                                                         keys):
    images = _images(tmp_path, small_uki)
    (tmp_path / "platform").mkdir()
    config = Config(root=str(tmp_path / "platform"), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(images),),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),)))
    machine = FakeMachine(report=make_report(ready={"kexec"}))
    machine.release_load.clear()          # the worker waits in load(): it cannot finish
    engine = core.Engine(config, machine)
    try:
        engine.stage(str(images / "a.efi"))
        assert machine.in_load.wait(10)
        # The load returns a moment later, as a kexec_file_load does; Cancel waits for
        # the worker to unload it and returns with State idle.
        threading.Timer(0.5, machine.release_load.set).start()
        engine.cancel()
        assert engine.state == "idle"
        assert machine.names()[-1] == "unload" and machine.loaded is False
    finally:
        machine.release_load.set()
        engine.wait(30)
        engine.close()


def test_the_real_list_images_marks_the_staged_image(tmp_path, small_uki, keys):
    subject = _real(tmp_path, _images(tmp_path, small_uki), [], str(keys["db"].cert))
    try:
        subject.stage_and_wait("a.efi")
        by_name = {Path(e["path"]).name: e for e in subject.engine.list_images()
                   if e["kind"] == "image"}
        assert by_name["a.efi"].get("staged") is True
        assert by_name["uki.efi"].get("staged") is False
    finally:
        subject.engine.close()


def test_waiting_is_bounded(subject):
    subject.hold()
    subject.engine.stage(str(subject.images / "a.efi"))
    start = time.monotonic()
    assert subject.engine.wait(0.05) == "staging"
    assert time.monotonic() - start < 5
