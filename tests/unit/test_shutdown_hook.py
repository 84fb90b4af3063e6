"""The system-shutdown hook (relaunchd.shutdown_hook): its argv (systemd-shutdown(8) runs it
with halt|poweroff|reboot|kexec), the conditions under which it quiesces, and the quiesce
itself — all on fixture trees (tests/support/sysfs_tree.py) with the runtime directory in
tmp. Its kernel-log messages go to a file standing in for /dev/kmsg; `main`, which acts on
the live root, is only run where it must stop before touching anything (no marker), with
the quiesce replaced by a tripwire."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relaunchd import shutdown_hook
from relaunchd.engine.state import HANDOFF, QUIESCE_JOURNAL, QUIESCE_PLAN, STAGED
from relaunchd.platform.quiesce import QuiescePolicy
from support.sysfs_tree import build_tree, plan_for, state


@pytest.fixture
def kmsg(tmp_path, monkeypatch) -> Path:
    """/dev/kmsg, as the hook opens it, is a file here."""
    path = tmp_path / "kmsg"
    path.touch()
    real_open = os.open

    def open_(name, flags, *args):
        return real_open(path if name == "/dev/kmsg" else name, flags | os.O_APPEND, *args)

    monkeypatch.setattr(shutdown_hook.os, "open", open_)
    return path


@pytest.fixture
def world(tmp_path) -> tuple[Path, Path]:
    """A fixture tree with a kexec image loaded, and a runtime directory in which relaunch
    r-1 is staged, handed off and has a CPU-only quiesce plan."""
    tree = build_tree(tmp_path / "root")
    (tree / "sys/kernel/kexec_loaded").write_text("1\n")
    run = tmp_path / "run"
    run.mkdir()
    plan = plan_for(tree, QuiescePolicy(offline_cpus="auto"))
    (run / HANDOFF).write_text(json.dumps({"id": "r-1"}))
    (run / STAGED).write_text(json.dumps({"id": "r-1"}))
    (run / QUIESCE_PLAN).write_text(json.dumps({"id": "r-1", "plan": json.loads(plan.to_json())}))
    return tree, run


def messages(kmsg: Path) -> list[str]:
    return kmsg.read_text().splitlines()


def test_a_handed_off_relaunch_is_quiesced(world, kmsg):
    tree, run = world
    assert shutdown_hook.run("kexec", str(run), str(tree)) == 0
    assert [state(tree)[f"cpu{n}"] for n in (1, 2, 3)] == ["0", "0", "0"]
    journal = (run / QUIESCE_JOURNAL).read_text().splitlines()
    assert [json.loads(line)["target"] for line in journal] == ["1", "2", "3"]
    [line] = messages(kmsg)
    # printk level 5 (notice), then the tag (Documentation/ABI/testing/dev-kmsg)
    assert line.startswith("<5>relaunchd-shutdown: relaunch r-1: quiesced in ")
    assert line.endswith("cpu-offline 1, cpu-offline 2, cpu-offline 3")


@pytest.mark.parametrize("verb", ["halt", "poweroff", "reboot", "suspend"])
def test_other_verbs_do_nothing(world, kmsg, verb):
    tree, run = world
    before = state(tree)
    assert shutdown_hook.run(verb, str(run), str(tree)) == 0
    assert state(tree) == before and messages(kmsg) == []


@pytest.mark.parametrize(("change", "says", "level"), [
    (lambda tree, run: (run / HANDOFF).unlink(), "no relaunch handed off", 6),
    (lambda tree, run: (run / STAGED).write_text(json.dumps({"id": "r-2"})),
     "staged record 'r-2'", 4),
    (lambda tree, run: (tree / "sys/kernel/kexec_loaded").write_text("0\n"),
     "kexec_loaded 0", 4),
    (lambda tree, run: (tree / "sys/kernel/kexec_loaded").unlink(), "kexec_loaded unreadable",
     4),
    (lambda tree, run: (run / QUIESCE_PLAN).write_text(json.dumps({"id": "r-0", "plan": {}})),
     "no quiesce plan for it", 4),
    (lambda tree, run: (run / HANDOFF).write_text("{torn"), "no relaunch handed off", 6),
])
def test_anything_that_is_not_our_relaunch_is_left_alone_and_said(world, kmsg, change, says,
                                                                  level):
    tree, run = world
    change(tree, run)
    before = state(tree)
    assert shutdown_hook.run("kexec", str(run), str(tree)) == 0
    assert state(tree) == before and not (run / QUIESCE_JOURNAL).exists()
    [line] = messages(kmsg)
    assert line.startswith(f"<{level}>relaunchd-shutdown: ") and says in line


def test_an_unusable_plan_is_an_error(world, kmsg):
    tree, run = world
    (run / QUIESCE_PLAN).write_text(json.dumps({"id": "r-1", "plan": {"version": 99}}))
    assert shutdown_hook.run("kexec", str(run), str(tree)) == 1
    assert "unusable quiesce plan" in messages(kmsg)[0]
    assert messages(kmsg)[0].startswith("<3>")


def test_a_failing_quiesce_is_rolled_back_and_reported(world, kmsg):
    tree, run = world
    os.remove(tree / "sys/devices/system/cpu/cpu3/online")     # the third store fails
    before = state(tree)
    assert shutdown_hook.run("kexec", str(run), str(tree)) == 1
    assert state(tree) == before
    assert "quiesce failed" in messages(kmsg)[0] and "rolled back" in messages(kmsg)[0]


def test_without_kmsg_the_message_goes_to_stderr(monkeypatch, capsys):
    def no_kmsg(name, flags, *args):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(shutdown_hook.os, "open", no_kmsg)
    shutdown_hook._say("hello", 4)
    assert capsys.readouterr().err == "relaunchd-shutdown: hello\n"


def test_the_runtime_directory_comes_from_the_configuration(tmp_path):
    config = tmp_path / "relaunchd.yaml"
    config.write_text("runtime_dir: /run/elsewhere\n")
    assert shutdown_hook._runtime_dir(str(config)) == "/run/elsewhere"
    config.write_text("runtime_dir: [not, a, path]\n")
    assert shutdown_hook._runtime_dir(str(config)) == shutdown_hook.DEFAULT_RUNTIME_DIR
    assert shutdown_hook._runtime_dir(str(tmp_path / "none.yaml")) \
        == shutdown_hook.DEFAULT_RUNTIME_DIR


# ------------------------------------------------------------------ argv

@pytest.fixture
def tripwire(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the hook must not quiesce the live system in a test")

    monkeypatch.setattr(shutdown_hook, "execute", never)
    monkeypatch.setattr(shutdown_hook, "SysWriter", never)


def test_no_argument_is_a_usage_error(capsys, tripwire):
    assert shutdown_hook.main([]) == 2
    assert "usage: relaunchd-shutdown-hook halt|poweroff|reboot|kexec" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["reboot", "poweroff", "halt"])
def test_main_with_another_verb_does_nothing(monkeypatch, tmp_path, tripwire, kmsg, verb):
    monkeypatch.setattr(shutdown_hook, "CONFIG", str(tmp_path / "none.yaml"))
    assert shutdown_hook.main([verb]) == 0
    assert messages(kmsg) == []


def test_main_kexec_without_a_marker_does_nothing(monkeypatch, tmp_path, tripwire, kmsg):
    run = tmp_path / "run"
    run.mkdir()
    (run / STAGED).write_text("{}")
    config = tmp_path / "relaunchd.yaml"
    config.write_text(f"runtime_dir: {run}\n")
    monkeypatch.setattr(shutdown_hook, "CONFIG", str(config))
    assert shutdown_hook.main(["kexec"]) == 0
    [line] = messages(kmsg)
    assert "no relaunch handed off" in line and f"{run}: staged.json" in line


def test_main_never_shows_a_traceback(monkeypatch, tmp_path, kmsg):
    def boom(verb, runtime_dir, root="/"):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(shutdown_hook, "run", boom)
    monkeypatch.setattr(shutdown_hook, "CONFIG", str(tmp_path / "none.yaml"))
    assert shutdown_hook.main(["kexec"]) == 1
    assert messages(kmsg) == ["<3>relaunchd-shutdown: internal error: RuntimeError: unexpected"]
