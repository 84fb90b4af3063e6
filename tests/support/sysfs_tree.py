"""A fixture sysfs tree for quiesce and the sysfs writer: four CPUs (cpu0 without an online
file, as on x86), four PCI devices (three bound), an NVMe with device nodes, and the
kernel's side of driver bind/unbind played by `FakeKernel`.

The kernel's side of a store is played by `FakeKernel` (a SysWriter whose `stored` hook
does what the kernel would): a store of a BDF into `drivers/<drv>/unbind` removes the
device's `driver` link and the driver's device link (ENODEV if it was not bound there),
`bind` creates them. `cpuN/online` needs no help: the file simply holds the stored value,
as the kernel's attribute would read back. Explicit semantics rather than asserting on the
written values alone, because rollback and rehearse must be judged on the *resulting
state* (is the device bound again, to the same driver?), and because the implementation
re-reads that state to verify each step.

Used by tests/unit/platform/quiesce/, tests/unit/platform/test_sysroot_writer.py and
tests/unit/test_shutdown_hook.py; nothing here touches the host's /sys.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from relaunchd.platform.quiesce import QuiescePlan, QuiescePolicy, compute_plan, execute
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter

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


FULL = QuiescePolicy(offline_cpus="auto", unbind_devices=["driver:virtio-net", "0000:00:05.0"])
STORES = 5  # 3 CPUs + 2 devices in the FULL plan


def plan_for(root: Path, policy: QuiescePolicy = FULL) -> QuiescePlan:
    return compute_plan(policy, SysRoot(str(root)))


def run(tree: Path, journal: Path, fail=None, plan: QuiescePlan | None = None):
    """Execute `plan` (default: FULL) on the tree with the kernel played by FakeKernel."""
    writer = FakeKernel(str(tree), fail=fail)
    return writer, execute(plan or plan_for(tree), SysRoot(str(tree)), writer, str(journal))
