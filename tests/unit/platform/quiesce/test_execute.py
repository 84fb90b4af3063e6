"""Quiesce (relaunchd.quiesce) and the sysfs writer (relaunchd.sysfs_write), on fixture trees.

Nothing here writes to the host's /sys, /proc or /dev: every `SysWriter` is rooted in a
tmp tree (and would refuse "/"). The holder test *reads* the real /proc through a
`<root>/proc -> /proc` link, to find a real child process.

The kernel's side of a store is played by `FakeKernel` (a SysWriter whose `stored` hook
does what the kernel would): a store of a BDF into `drivers/<drv>/unbind` removes the
device's `driver` link and the driver's device link (ENODEV if it was not bound there),
`bind` creates them. `cpuN/online` needs no help: the file simply holds the stored value,
as the kernel's attribute would read back. We chose explicit semantics over asserting on
the written values alone because rollback and rehearse must be judged on the *resulting
state* (is the device bound again, to the same driver?), and because the implementation
re-reads that state to verify each step. The written values are asserted as well
(`writer.log`) where the order matters.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.errors import InvalidArgument, QuiesceFailed
from relaunchd.platform import quiesce
from relaunchd.platform.quiesce import (
    QuiescePlan,
    QuiescePolicy,
    compute_plan,
    execute,
    rehearse,
    rollback,
)
from relaunchd.platform.quiesce import journal as quiesce_journal
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import FailAt, SysWriter

HERE = Path(__file__).resolve().parent

DEVICES = {  # address: (class, driver or None)
    "0000:00:03.0": ("0x020000", "virtio-net"),
    "0000:00:04.0": ("0x010802", "nvme"),
    "0000:00:05.0": ("0x020000", "e1000e"),
    "0000:00:06.0": ("0x060000", None),
}


class FakeKernel(SysWriter):
    """A SysWriter that plays the kernel's bind/unbind semantics on the fixture tree."""

    def stored(self, path: str, value: str) -> None:
        parts = path.split("/")
        if path.startswith("/sys/bus/pci/drivers/") and len(parts) == 7:
            drv, op = parts[5], parts[6]
            root = Path(self.root)
            dev_link = root / "sys/bus/pci/devices" / value / "driver"
            drv_link = root / "sys/bus/pci/drivers" / drv / value
            if op == "unbind":
                if not drv_link.is_symlink():
                    raise OSError(errno.ENODEV, "not bound to this driver", path)
                dev_link.unlink()
                drv_link.unlink()
            elif op == "bind":
                if dev_link.is_symlink():
                    raise OSError(errno.EBUSY, "already bound", path)
                dev_link.symlink_to(f"../../../bus/pci/drivers/{drv}")
                drv_link.symlink_to(f"../../../../devices/pci0000:00/{value}")


def build_tree(root: Path, *, reboot_cpu: int | None = 0) -> Path:
    cpu = root / "sys/devices/system/cpu"
    for n in range(4):
        (cpu / f"cpu{n}").mkdir(parents=True)
        if n:  # cpu0 has no online file: it cannot be offlined
            (cpu / f"cpu{n}/online").write_text("1\n")
    (cpu / "online").write_text("0-3\n")
    (cpu / "cpufreq").mkdir()
    if reboot_cpu is not None:
        (root / "sys/kernel/reboot").mkdir(parents=True)
        (root / "sys/kernel/reboot/cpu").write_text(f"{reboot_cpu}\n")
    bus = root / "sys/bus/pci"
    (bus / "devices").mkdir(parents=True)
    for address, (cls, drv) in DEVICES.items():
        dev = root / "sys/devices/pci0000:00" / address
        dev.mkdir(parents=True)
        (dev / "class").write_text(cls + "\n")
        (dev / "uevent").write_text(f"PCI_SLOT_NAME={address}\n")
        (bus / "devices" / address).symlink_to(f"../../../devices/pci0000:00/{address}")
        if drv:
            d = bus / "drivers" / drv
            if not d.exists():
                d.mkdir(parents=True)
                (d / "bind").write_text("")
                (d / "unbind").write_text("")
            (dev / "driver").symlink_to(f"../../../bus/pci/drivers/{drv}")
            (d / address).symlink_to(f"../../../../devices/pci0000:00/{address}")
    nvme = root / "sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0"
    (nvme / "nvme0n1").mkdir(parents=True)
    (nvme / "uevent").write_text("MAJOR=241\nMINOR=0\nDEVNAME=nvme0\n")
    (nvme / "nvme0n1/uevent").write_text("MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\nDEVTYPE=disk\n")
    (root / "dev").mkdir()
    for node in ("tpm0", "tpmrm0", "nvme0", "null"):
        (root / "dev" / node).write_text("")
    return root


def state(root: Path) -> dict[str, str | None]:
    """What quiesce may change: CPU online values and driver links."""
    out: dict[str, str | None] = {}
    for n in range(4):
        f = root / f"sys/devices/system/cpu/cpu{n}/online"
        out[f"cpu{n}"] = f.read_text().strip() if f.exists() else None
    for address in DEVICES:
        link = root / "sys/bus/pci/devices" / address / "driver"
        out[address] = os.path.basename(os.readlink(link)) if link.is_symlink() else None
        for drv in ("virtio-net", "nvme", "e1000e"):
            if (root / "sys/bus/pci/drivers" / drv / address).is_symlink():
                out[f"{drv}/{address}"] = "linked"
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "root")


FULL = QuiescePolicy(offline_cpus="auto", unbind_devices=["driver:virtio-net", "0000:00:05.0"])


def plan_for(root: Path, policy: QuiescePolicy = FULL) -> QuiescePlan:
    return compute_plan(policy, SysRoot(str(root)))


# ------------------------------------------------------------------ plan resolution

def test_auto_offlines_all_but_reboot_cpu_and_unhotpluggable(tree):
    plan = plan_for(tree, QuiescePolicy())
    assert plan.reboot_cpu == 0
    assert plan.offline_cpus == (1, 2, 3)
    assert [k.cpu for k in plan.kept_cpus] == [0]
    assert plan.devices == ()


def test_reboot_cpu_is_kept_and_unofflinable_cpu_kept(tmp_path):
    root = build_tree(tmp_path / "r", reboot_cpu=2)
    plan = plan_for(root, QuiescePolicy())
    assert plan.reboot_cpu == 2
    assert plan.offline_cpus == (1, 3)
    kept = {k.cpu: k.reason for k in plan.kept_cpus}
    assert kept[2] == "reboot CPU"
    assert "no online file" in kept[0]


def test_reboot_cpu_defaults_to_zero(tmp_path):
    root = build_tree(tmp_path / "r", reboot_cpu=None)
    assert plan_for(root, QuiescePolicy()).reboot_cpu == 0


def test_none_and_list(tree):
    assert plan_for(tree, QuiescePolicy(offline_cpus="none")).offline_cpus == ()
    assert plan_for(tree, QuiescePolicy(offline_cpus=[3, 2])).offline_cpus == (2, 3)
    plan = plan_for(tree, QuiescePolicy(offline_cpus=[0, 1]))
    assert plan.offline_cpus == (1,)
    assert [k.cpu for k in plan.kept_cpus] == [0]
    with pytest.raises(InvalidArgument, match="CPU 7"):
        plan_for(tree, QuiescePolicy(offline_cpus=[7]))
    with pytest.raises(InvalidArgument):
        plan_for(tree, QuiescePolicy(offline_cpus="some"))


def test_already_offline_cpu_not_planned(tree):
    (tree / "sys/devices/system/cpu/cpu3/online").write_text("0\n")
    plan = plan_for(tree, QuiescePolicy())
    assert plan.offline_cpus == (1, 2)
    assert any("CPU 3 is already offline" in n for n in plan.notes)


@pytest.mark.parametrize(("selectors", "expected"), [
    (["0000:00:03.0"], ["0000:00:03.0"]),
    (["00:03.0"], ["0000:00:03.0"]),                       # domain optional, as in config
    (["driver:nvme"], ["0000:00:04.0"]),
    (["class:0x02"], ["0000:00:03.0", "0000:00:05.0"]),    # base class
    (["class:0x0108"], ["0000:00:04.0"]),                  # base class + subclass
    (["class:0x020000"], ["0000:00:03.0", "0000:00:05.0"]),
    (["class:020000", "driver:e1000e"], ["0000:00:03.0", "0000:00:05.0"]),
    (["driver:i915"], []),                                 # matches nothing: a note
])
def test_device_selectors(tree, selectors, expected):
    plan = plan_for(tree, QuiescePolicy(offline_cpus="none", unbind_devices=selectors))
    assert [d.address for d in plan.devices] == expected
    for d in plan.devices:
        assert d.driver == DEVICES[d.address][1]
        assert d.pci_class == DEVICES[d.address][0]


def test_device_nodes_found_through_uevent(tree):
    plan = plan_for(tree, QuiescePolicy(offline_cpus="none", unbind_devices=["driver:nvme"]))
    assert plan.devices[0].nodes == ("/dev/nvme0", "/dev/nvme0n1")
    assert plan.devices[0].selectors == ("driver:nvme",)


def test_unbound_device_is_noted_not_planned(tree):
    plan = plan_for(tree, QuiescePolicy(offline_cpus="none", unbind_devices=["0000:00:06.0"]))
    assert plan.devices == ()
    assert any("0000:00:06.0 has no driver" in n for n in plan.notes)


@pytest.mark.parametrize("selector", [
    "pci:0000:00:03.0", "class:0xzz", "class:0x123", "driver:a/b", "driver:..", "eth0",
    "0000:00:09.0",  # well-formed but absent
])
def test_bad_or_unknown_selector_is_named_error(tree, selector):
    with pytest.raises(InvalidArgument) as info:
        plan_for(tree, QuiescePolicy(offline_cpus="none", unbind_devices=[selector]))
    assert info.value.name == "InvalidArgument"


def test_plan_json_round_trip(tree):
    plan = plan_for(tree)
    again = QuiescePlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(plan.to_json())["version"] == 1


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=99),
    lambda d: d.update(offline_cpus=[0]),                     # the reboot CPU
    lambda d: d["devices"][0].update(driver="../../x"),
    lambda d: d["devices"][0].update(address="../0000:00:03.0"),
    lambda d: d.pop("kept_cpus"),
    lambda d: d.update(offline_cpus="1"),
    lambda d: d["devices"][0].update(nodes="/dev/x"),
])
def test_plan_from_json_rejects_bad(tree, mutate):
    d = json.loads(plan_for(tree).to_json())
    mutate(d)
    with pytest.raises(InvalidArgument):
        QuiescePlan.from_json(json.dumps(d))
    with pytest.raises(InvalidArgument):
        QuiescePlan.from_json("{not json")


# ------------------------------------------------------------------ the writer's rules

def test_writer_refuses_live_root_and_outside_sys(tree, tmp_path):
    with pytest.raises(InvalidArgument):
        SysWriter("/")
    with pytest.raises(InvalidArgument):
        SysWriter(str(tree / ".." / ".." / ".." / ".." / ".." / ".." / ".." / ".."))
    w = SysWriter(str(tree))
    for bad in ("/proc/sys/kernel/sysrq", "/dev/tpm0", "/sys/../etc/x", "sys/kernel/x", "/sys"):
        with pytest.raises(InvalidArgument):
            w.write(bad, "1")
    assert w.log == []


def test_writer_only_existing_regular_attributes(tree, tmp_path):
    w = SysWriter(str(tree))
    with pytest.raises(FileNotFoundError):            # no O_CREAT
        w.write("/sys/devices/system/cpu/cpu0/online", "0")
    assert not (tree / "sys/devices/system/cpu/cpu0/online").exists()
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (tree / "sys/kernel/link").symlink_to(outside)
    with pytest.raises(OSError) as info:               # O_NOFOLLOW on the last component
        w.write("/sys/kernel/link", "x")
    assert info.value.errno == errno.ELOOP
    (tree / "sys/escape").symlink_to(tmp_path)          # a directory link out of <root>/sys
    with pytest.raises(InvalidArgument):
        w.write("/sys/escape/outside", "x")
    assert outside.read_text() == "keep\n"
    os.mkfifo(tree / "sys/kernel/fifo")
    with pytest.raises(OSError):                        # never blocks on a FIFO
        w.write("/sys/kernel/fifo", "x")


def test_writer_through_sysfs_symlinks_and_fault_hooks(tree):
    w = SysWriter(str(tree), fail=FailAt(nth=2))
    w.write("/sys/bus/pci/devices/0000:00:03.0/driver/unbind", "0000:00:03.0")
    assert (tree / "sys/bus/pci/drivers/virtio-net/unbind").read_text() == "0000:00:03.0"
    with pytest.raises(OSError, match="injected"):
        w.write("/sys/devices/system/cpu/cpu1/online", "0")
    assert (tree / "sys/devices/system/cpu/cpu1/online").read_text() == "1\n"
    w.write("/sys/devices/system/cpu/cpu1/online", "0")
    assert w.count == 3 and len(w.log) == 2
    w2 = SysWriter(str(tree), fail=FailAt(path="/sys/devices/system/cpu/cpu2/online",
                                          error=errno.EBUSY, after=True))
    with pytest.raises(OSError) as info:
        w2.write("/sys/devices/system/cpu/cpu2/online", "0")
    assert info.value.errno == errno.EBUSY
    assert (tree / "sys/devices/system/cpu/cpu2/online").read_text() == "0"


# ------------------------------------------------------------------ execution and rollback

def run(tree: Path, journal: Path, fail=None, plan: QuiescePlan | None = None):
    writer = FakeKernel(str(tree), fail=fail)
    return writer, execute(plan or plan_for(tree), SysRoot(str(tree)), writer, str(journal))


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


STORES = 5  # 3 CPUs + 2 devices in the FULL plan


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


CRASH_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import test_execute as t
from relaunchd.platform.quiesce import QuiescePlan, execute
from relaunchd.platform.sysroot import SysRoot
root, plan, journal, crash_at = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def crash(n, path, value):
    if n == crash_at:
        os._exit(70)       # SIGKILL-like: no cleanup, no rollback
execute(QuiescePlan.from_json(open(plan).read()), SysRoot(root), t.FakeKernel(root, fail=crash),
        journal)
os._exit(71)               # finished quiescing, then died
"""


@pytest.mark.parametrize("crash_at", range(1, STORES + 2))
def test_rollback_from_journal_left_by_a_crash(tree, tmp_path, crash_at):
    before = state(tree)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan_for(tree).to_json())
    journal = tmp_path / "j.jsonl"
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(HERE), str(tree),
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


# ------------------------------------------------------------------ who would be cut off

def test_processes_holding_tpm_and_device_nodes_are_reported(tree):
    (tree / "proc").symlink_to("/proc")     # read-only view of the real processes
    code = ("import sys; fs = [open(p, 'rb') for p in sys.argv[1:]]; "
            "print('ready', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(tree / "dev/tpm0"),
                              str(tree / "dev/nvme0"), str(tree / "dev/null")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        plan = plan_for(tree, QuiescePolicy(offline_cpus="none",
                                            unbind_devices=["driver:nvme"]))
        mine = {(h.path, h.comm) for h in plan.holders if h.pid == child.pid}
        assert {p for p, _ in mine} == {"/dev/nvme0", "/dev/tpm0"}
        assert all(comm for _, comm in mine)
        # Not unbinding nvme: only the TPM holder matters.
        plan = plan_for(tree, QuiescePolicy(offline_cpus="none"))
        assert {h.path for h in plan.holders if h.pid == child.pid} == {"/dev/tpm0"}
        assert QuiescePlan.from_json(plan.to_json()) == plan
    finally:
        child.kill()
        child.wait()
    plan = plan_for(tree, QuiescePolicy(offline_cpus="none"))
    assert all(h.pid != child.pid for h in plan.holders)


def test_holder_scan_tolerates_vanishing_processes(tree):
    proc = tree / "proc"
    (proc / "123/fd").mkdir(parents=True)
    (proc / "123/fd/3").symlink_to(tree / "dev/tpm0")
    (proc / "123/comm").write_text("tpm2-abrmd\n")
    (proc / "456").mkdir()                   # gone between listing and reading its fds
    (proc / "self").mkdir()
    holders, notes = quiesce.find_holders(SysRoot(str(tree)), set(), exclude=set())
    assert holders == (quiesce.Holder(123, "tpm2-abrmd", "/dev/tpm0"),)
    assert notes == []
    holders, notes = quiesce.find_holders(SysRoot(str(tree)), set(), exclude=set(),
                                          max_processes=1)
    assert len(holders) == 1 and "stopped after 1" in notes[0]
