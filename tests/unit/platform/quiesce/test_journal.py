"""The quiesce journal (relaunchd.platform.quiesce.journal): every action durable before its
store, and a journal left by a crash (or torn mid-line) still rolls everything back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.platform.quiesce import journal as quiesce_journal
from relaunchd.platform.quiesce import rollback
from relaunchd.platform.sysroot import SysRoot
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
