"""Executing a quiesce plan, rolling it back and rehearsing it
(relaunchd.platform.quiesce.execute) on a fixture sysfs tree whose kernel side is played by
tests/support/sysfs_tree.FakeKernel.

Nothing here writes to the host's /sys, /proc or /dev: every `SysWriter` is rooted in a
tmp tree (and would refuse "/"). The written values are asserted as well (`writer.log`)
where the order matters."""

from __future__ import annotations

import pytest

from relaunchd.errors import QuiesceFailed
from relaunchd.platform.quiesce import QuiescePolicy, rehearse, rollback
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import FailAt, SysWriter
from support.sysfs_tree import STORES, FakeKernel, plan_for, run, state

# ------------------------------------------------------------------ execution and rollback

def test_execute_quiesces_and_rollback_restores(tree, tmp_path):
    before = state(tree)
    journal = tmp_path / "run/quiesce.jsonl"
    writer, report = run(tree, journal)
    now = state(tree)
    assert [now[f"cpu{n}"] for n in (1, 2, 3)] == ["0", "0", "0"]
    assert now["0000:00:03.0"] is None and now["0000:00:05.0"] is None
    assert now["0000:00:04.0"] == "nvme"
    assert [(e.action, e.target, e.previous) for e in report.done] == [
        ("cpu-offline", "1", "1"), ("cpu-offline", "2", "1"), ("cpu-offline", "3", "1"),
        ("driver-unbind", "0000:00:03.0", "virtio-net"),
        ("driver-unbind", "0000:00:05.0", "e1000e")]
    assert writer.log[-1] == ("/sys/bus/pci/drivers/e1000e/unbind", "0000:00:05.0")
    rb = rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree)))
    assert rb.ok and len(rb.restored) == 5
    assert state(tree) == before
    # A second rollback has nothing left to do.
    again = rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree)))
    assert again.ok and again.restored == [] and again.already == []


@pytest.mark.parametrize("after", [False, True], ids=["fails", "stores-then-fails"])
@pytest.mark.parametrize("nth", range(1, STORES + 1))
def test_injected_failure_at_every_step_rolls_back(tree, tmp_path, nth, after):
    before = state(tree)
    journal = tmp_path / "j.jsonl"
    with pytest.raises(QuiesceFailed) as info:
        run(tree, journal, fail=FailAt(nth=nth, after=after))
    assert info.value.name == "QuiesceFailed"
    assert "rolled back" in str(info.value) and "INCOMPLETE" not in str(info.value)
    assert state(tree) == before
    # The journal is closed: a new quiesce may start.
    run(tree, journal)
    assert state(tree) != before


def test_failed_rollback_is_reported(tree, tmp_path):
    journal = tmp_path / "j.jsonl"
    run(tree, journal)
    broken = FakeKernel(str(tree), fail=FailAt(path="/sys/bus/pci/drivers/e1000e/bind"))
    rb = rollback(str(journal), SysRoot(str(tree)), broken)
    assert not rb.ok and "0000:00:05.0" in rb.failed[0]
    assert len(rb.restored) == 4                       # the rest was still undone
    with pytest.raises(QuiesceFailed, match="not rolled back"):
        run(tree, journal)                             # refuses to start over a live journal
    assert rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree))).ok


def test_rollback_restores_the_driver_seen_at_execution(tree, tmp_path):
    plan = plan_for(tree, QuiescePolicy(offline_cpus="none", unbind_devices=["0000:00:03.0"]))
    # Between stage and quiesce the device moved to another driver.
    t = tree / "sys/bus/pci"
    (t / "devices/0000:00:03.0/driver").unlink()
    (t / "drivers/virtio-net/0000:00:03.0").unlink()
    FakeKernel(str(tree)).write("/sys/bus/pci/drivers/e1000e/bind", "0000:00:03.0")
    before = state(tree)
    journal = tmp_path / "j.jsonl"
    run(tree, journal, plan=plan)
    assert state(tree)["0000:00:03.0"] is None
    rollback(str(journal), SysRoot(str(tree)), FakeKernel(str(tree)))
    assert state(tree) == before and before["0000:00:03.0"] == "e1000e"


# ------------------------------------------------------------------ rehearsal

def test_rehearse_leaves_everything_as_before(tree, tmp_path):
    before = state(tree)
    writer = FakeKernel(str(tree))
    report = rehearse(plan_for(tree), SysRoot(str(tree)), writer, str(tmp_path / "j.jsonl"))
    assert report.ok, report.mismatches
    assert len(report.executed) == 5 and len(report.rollback.restored) == 5
    assert state(tree) == before
    stores = [p for p, _ in writer.log]
    assert stores[:5] == [
        "/sys/devices/system/cpu/cpu1/online", "/sys/devices/system/cpu/cpu2/online",
        "/sys/devices/system/cpu/cpu3/online", "/sys/bus/pci/drivers/virtio-net/unbind",
        "/sys/bus/pci/drivers/e1000e/unbind"]
    assert stores[5:] == [
        "/sys/bus/pci/drivers/e1000e/bind", "/sys/bus/pci/drivers/virtio-net/bind",
        "/sys/devices/system/cpu/cpu3/online", "/sys/devices/system/cpu/cpu2/online",
        "/sys/devices/system/cpu/cpu1/online"]


def test_rehearse_reports_a_store_without_effect(tree, tmp_path):
    # A plain SysWriter: the unbind store lands in the file but nothing unbinds.
    before = state(tree)
    with pytest.raises(QuiesceFailed, match="still bound"):
        rehearse(plan_for(tree), SysRoot(str(tree)), SysWriter(str(tree)),
                 str(tmp_path / "j.jsonl"))
    assert state(tree) == before
