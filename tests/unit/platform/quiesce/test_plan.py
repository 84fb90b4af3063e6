"""The quiesce plan (relaunchd.platform.quiesce.plan) on a fixture sysfs tree
(tests/support/sysfs_tree.py): which CPUs go offline and which devices are unbound, the
selectors, the plan's JSON form, and the processes a quiesce would cut off.

The holder test *reads* the real /proc through a `<root>/proc -> /proc` link, to find a
real child process; nothing here writes outside the tmp tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.platform import quiesce
from relaunchd.platform.quiesce import QuiescePlan, QuiescePolicy
from relaunchd.platform.sysroot import SysRoot
from support.sysfs_tree import DEVICES, build_tree, plan_for

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
