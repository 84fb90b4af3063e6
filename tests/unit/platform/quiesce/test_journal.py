"""The quiesce journal (relaunchd.platform.quiesce.journal): every action durable before its
store, and a journal left by a crash (or torn mid-line) still rolls everything back."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.errors import InvalidArgument, QuiesceFailed
from relaunchd.platform.quiesce import (
    CPU_OFFLINE,
    DRIVER_UNBIND,
    ROLLED_BACK,
    Journal,
    QuiescePlan,
    execute,
    rollback,
)
from relaunchd.platform.quiesce import journal as quiesce_journal
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter
from support.sysfs_tree import STORES, FakeKernel, plan_for, run, state

TESTS = Path(__file__).resolve().parents[3]       # tests/: support.* for the crash child


def test_journal_entry_is_durable_before_each_store(tree, tmp_path, monkeypatch):
    journal = tmp_path / "j.jsonl"
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(quiesce_journal.os, "fsync", fsync)

    def spy(n, path, value):
        lines = journal.read_text().splitlines()
        assert len(lines) == n, f"store {n} ({path}) before its journal entry"
        entry = json.loads(lines[-1])
        if entry["action"] == "cpu-offline":
            assert path == f"/sys/devices/system/cpu/cpu{entry['target']}/online"
        else:
            assert path == f"/sys/bus/pci/drivers/{entry['previous']}/unbind"
            assert value == entry["target"]
        assert events[-1] == "fsync"
        events.append(f"store {n}")

    run(tree, journal, fail=spy)
    assert events.count("fsync") >= 5 and events[-1] == "store 5"


CRASH_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from support.sysfs_tree import FakeKernel
from relaunchd.platform.quiesce import QuiescePlan, execute
from relaunchd.platform.sysroot import SysRoot
root, plan, journal, crash_at = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def crash(n, path, value):
    if n == crash_at:
        os._exit(70)       # SIGKILL-like: no cleanup, no rollback
execute(QuiescePlan.from_json(open(plan).read()), SysRoot(root), FakeKernel(root, fail=crash),
        journal)
os._exit(71)               # finished quiescing, then died
"""


@pytest.mark.parametrize("crash_at", range(1, STORES + 2))
def test_rollback_from_journal_left_by_a_crash(tree, tmp_path, crash_at):
    before = state(tree)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan_for(tree).to_json())
    journal = tmp_path / "j.jsonl"
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(TESTS), str(tree),
                            str(plan_file), str(journal), str(crash_at)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == (70 if crash_at <= STORES else 71), child.stderr
    # The crashed process journaled crash_at entries (the last one's store never ran).
    assert len(journal.read_text().splitlines()) == min(crash_at, STORES)
    if crash_at > 1:
        assert state(tree) != before
    rb = rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree)))
    assert rb.ok
    assert state(tree) == before


def test_torn_last_journal_line_is_ignored(tree, tmp_path):
    before = state(tree)
    journal = tmp_path / "j.jsonl"
    run(tree, journal)
    with open(journal, "ab") as f:
        f.write(b'{"action": "cpu-offl')
    rb = rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree)))
    assert rb.ok and rb.notes == []
    assert state(tree) == before


# ------------------------------------------------------------------
# odd journal entries (issue 14 item 7)

DEVICE = "0000:00:03.0"
DRIVER = "virtio-net"


class Kernel(SysWriter):
    """Binding creates the device's driver link; `explode_on` makes one store raise an
    error no rollback step expects (a bug's stand-in)."""

    explode_on: str | None = None

    def stored(self, path: str, value: str) -> None:
        if path == self.explode_on:
            raise RuntimeError("unexpected failure in a store")
        root = Path(self.root)
        if path == f"/sys/bus/pci/drivers/{DRIVER}/bind":
            (root / f"sys/bus/pci/devices/{value}/driver").symlink_to(
                f"../../../bus/pci/drivers/{DRIVER}")
        elif path == f"/sys/bus/pci/drivers/{DRIVER}/unbind":
            link = root / f"sys/bus/pci/devices/{value}/driver"
            if not link.is_symlink():
                raise OSError(errno.ENODEV, "not bound", path)
            link.unlink()


@pytest.fixture
def odd_tree(tmp_path) -> Path:
    root = tmp_path / "root"
    for n in range(4):
        (root / f"sys/devices/system/cpu/cpu{n}").mkdir(parents=True)
        if n:
            (root / f"sys/devices/system/cpu/cpu{n}/online").write_text("1\n")
    (root / "sys/kernel/reboot").mkdir(parents=True)
    (root / "sys/kernel/reboot/cpu").write_text("0\n")
    dev = root / "sys/devices/pci0000:00" / DEVICE
    dev.mkdir(parents=True)
    (dev / "class").write_text("0x020000\n")
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    (root / "sys/bus/pci/devices" / DEVICE).symlink_to(f"../../../devices/pci0000:00/{DEVICE}")
    drv = root / "sys/bus/pci/drivers" / DRIVER
    drv.mkdir(parents=True)
    (drv / "bind").write_text("")
    (drv / "unbind").write_text("")
    (dev / "driver").symlink_to(f"../../../bus/pci/drivers/{DRIVER}")
    return root


def online(odd_tree: Path, cpu: int) -> str:
    return (odd_tree / f"sys/devices/system/cpu/cpu{cpu}/online").read_text().strip()


def bound(odd_tree: Path) -> bool:
    return (odd_tree / "sys/bus/pci/devices" / DEVICE / "driver").is_symlink()


def quiesced_journal(odd_tree: Path, tmp_path: Path) -> Path:
    """A real quiesce of CPUs 1, 2, 3 and the device; the journal it wrote."""
    journal = tmp_path / "journal.jsonl"
    plan = QuiescePlan(reboot_cpu=0, offline_cpus=(1, 2, 3), kept_cpus=(), devices=(),
                       holders=())
    execute(plan, SysRoot(str(odd_tree)), Kernel(str(odd_tree)), str(journal))
    Kernel(str(odd_tree)).write(f"/sys/bus/pci/drivers/{DRIVER}/unbind", DEVICE)
    with open(journal, "a") as f:      # as execute() journals an unbind
        f.write(json.dumps({"action": DRIVER_UNBIND, "target": DEVICE,
                            "previous": DRIVER}) + "\n")
    assert [online(odd_tree, n) for n in (1, 2, 3)] == ["0", "0", "0"] and not bound(odd_tree)
    return journal


def insert_line(journal: Path, index: int, entry: dict) -> int:
    """Put `entry` as the `index`-th line; its 1-based line number."""
    lines = journal.read_text().splitlines()
    lines.insert(index, json.dumps(entry, ensure_ascii=False))
    journal.write_text("\n".join(lines) + "\n")
    return index + 1


ODD = [
    ({"action": CPU_OFFLINE, "target": "²", "previous": "1"}, "superscript two"),
    ({"action": CPU_OFFLINE, "target": "٣", "previous": "1"}, "arabic-indic three"),
    ({"action": CPU_OFFLINE, "target": "３", "previous": "1"}, "fullwidth three"),
    ({"action": CPU_OFFLINE, "target": "2\n", "previous": "1"}, "trailing newline"),
    ({"action": CPU_OFFLINE, "target": " 2", "previous": "1"}, "leading space"),
    ({"action": CPU_OFFLINE, "target": "-1", "previous": "1"}, "negative"),
    ({"action": CPU_OFFLINE, "target": "02", "previous": "1"}, "leading zero"),
    ({"action": CPU_OFFLINE, "target": 2, "previous": "1"}, "a JSON number"),
    ({"action": CPU_OFFLINE, "target": "2", "previous": "²"}, "odd previous value"),
    ({"action": DRIVER_UNBIND, "target": DEVICE + "\n", "previous": DRIVER},
     "address with newline"),
    ({"action": DRIVER_UNBIND, "target": "０000:00:03.0", "previous": DRIVER},
     "fullwidth address"),
    ({"action": DRIVER_UNBIND, "target": DEVICE, "previous": "../../../kernel"},
     "driver path"),
    ({"action": DRIVER_UNBIND, "target": DEVICE, "previous": ".."}, "driver dot-dot"),
    ({"action": DRIVER_UNBIND, "target": DEVICE, "previous": ["virtio-net"]},
     "a JSON list"),
    ({"action": "cpu-online", "target": "1", "previous": "0"}, "unknown action"),
    ({"action": ROLLED_BACK, "target": "1", "previous": ""}, "marker with a target"),
]


@pytest.mark.parametrize("position", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize(("entry", "what"), ODD, ids=[o[1] for o in ODD])
def test_rollback_reports_an_odd_entry_and_undoes_the_rest(odd_tree, tmp_path, entry, what,
                                                           position):
    journal = quiesced_journal(odd_tree, tmp_path)
    line = insert_line(journal, position, entry)
    report = rollback(str(journal), SysRoot(str(odd_tree)), Kernel(str(odd_tree)))
    # everything relaunchd really did is undone ...
    assert [online(odd_tree, n) for n in (1, 2, 3)] == ["1", "1", "1"]
    assert bound(odd_tree)
    assert sorted(report.restored) == sorted(["CPU 1 online", "CPU 2 online", "CPU 3 online",
                                              f"{DEVICE} bound to {DRIVER}"])
    # ... and the odd entry is named, by line, as not rolled back
    assert not report.ok and len(report.failed) == 1, report.failed
    assert f"journal line {line}" in report.failed[0] and "not rolled back" in report.failed[0]


def test_the_journal_is_checked_when_read(odd_tree, tmp_path):
    journal = quiesced_journal(odd_tree, tmp_path)
    insert_line(journal, 1, ODD[0][0])
    contents = Journal(str(journal)).read()
    assert [e.target for e in contents.entries] == ["1", "2", "3", DEVICE]
    assert [line for line, _ in contents.rejected] == [2]
    assert "'²'" in contents.rejected[0][1]


def test_a_reported_entry_does_not_block_the_next_quiesce(odd_tree, tmp_path):
    """What relaunchd did was undone; the odd line is reported once (it can never be
    undone by relaunchd) and does not keep every later quiesce refused."""
    journal = quiesced_journal(odd_tree, tmp_path)
    insert_line(journal, 0, ODD[0][0])
    assert not rollback(str(journal), SysRoot(str(odd_tree)), Kernel(str(odd_tree))).ok
    again = rollback(str(journal), SysRoot(str(odd_tree)), Kernel(str(odd_tree)))
    assert again.ok and again.restored == [] and again.failed == []
    plan = QuiescePlan(reboot_cpu=0, offline_cpus=(2,), kept_cpus=(), devices=(), holders=())
    execute(plan, SysRoot(str(odd_tree)), Kernel(str(odd_tree)), str(journal))
    assert online(odd_tree, 2) == "0"


def test_an_unexpected_error_in_one_step_does_not_stop_the_rest(odd_tree, tmp_path):
    journal = quiesced_journal(odd_tree, tmp_path)
    kernel = Kernel(str(odd_tree))
    kernel.explode_on = "/sys/devices/system/cpu/cpu2/online"
    report = rollback(str(journal), SysRoot(str(odd_tree)), kernel)
    assert [online(odd_tree, n) for n in (1, 3)] == ["1", "1"] and bound(odd_tree)
    assert len(report.failed) == 1 and report.failed[0].startswith(f"{CPU_OFFLINE} 2: ")
    # an entry that failed to undo stays pending: the next rollback finishes it
    with pytest.raises(QuiesceFailed, match="not rolled back"):
        plan = QuiescePlan(reboot_cpu=0, offline_cpus=(1,), kept_cpus=(), devices=(),
                           holders=())
        execute(plan, SysRoot(str(odd_tree)), Kernel(str(odd_tree)), str(journal))
    assert rollback(str(journal), SysRoot(str(odd_tree)), Kernel(str(odd_tree))).ok
    assert online(odd_tree, 2) == "1"


@pytest.mark.parametrize("cpu", ["٣", "3", 3.0, True], ids=["arabic-indic", "string",
                                                           "float", "bool"])
def test_the_plan_takes_only_json_integers(cpu):
    """The plan the shutdown hook executes: a CPU number is a JSON integer, nothing int()
    would merely accept."""
    plan = json.loads(QuiescePlan(reboot_cpu=0, offline_cpus=(3,), kept_cpus=(), devices=(),
                                  holders=()).to_json())
    plan["offline_cpus"] = [cpu]
    with pytest.raises(InvalidArgument, match="malformed quiesce plan"):
        QuiescePlan.from_json(json.dumps(plan, ensure_ascii=False))
