"""units/relaunchd.service against what the code does (issue #14, items 5 and 8), with
systemd-analyze as the oracle for the unit itself.

- The sysfs paths the unit re-opens for writing (ReadWritePaths= under /sys, which
  ProtectKernelTunables= makes read-only) are exactly those the quiesce code stores into:
  a quiesce and its rollback on a fixture tree record every store (`SysWriter.log`), and
  each store must lie below one re-opened path, each re-opened path must serve a store,
  and nothing re-opens /sys/kernel.
- The bounding set keeps the capabilities the holder scan needs
  (plan.SCAN_CAPABILITIES), and `systemd-analyze security` still scores it ≤ 2.5.
- `systemd-analyze verify` has nothing to say about the unit.

The VM tier runs the same unit for real (tests/vm/test_service*.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relaunchd.platform.quiesce import (
    PlannedDevice,
    QuiescePlan,
    execute,
    rollback,
)
from relaunchd.platform.quiesce.plan import SCAN_CAPABILITIES
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "units" / "relaunchd.service"
EXPOSURE_LIMIT = 2.5

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze")


def unit_values(key: str) -> list[str]:
    """Every whitespace-separated value of `key=` in the unit (assignments accumulate)."""
    values: list[str] = []
    for line in UNIT.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values += value.split()
    return values


class Kernel(SysWriter):
    """Plays bind/unbind on the fixture tree (the device's driver link)."""

    def stored(self, path: str, value: str) -> None:
        link = Path(self.root) / f"sys/bus/pci/devices/{value}/driver"
        if path.endswith("/unbind"):
            link.unlink()
        elif path.endswith("/bind"):
            link.symlink_to("../../../bus/pci/drivers/virtio-pci")


def quiesce_stores(tmp_path: Path) -> set[str]:
    """Every sysfs path a quiesce (CPU 1 offline, one device unbound) and its rollback
    store into."""
    root = tmp_path / "root"
    for n in (0, 1):
        (root / f"sys/devices/system/cpu/cpu{n}").mkdir(parents=True)
    (root / "sys/devices/system/cpu/cpu1/online").write_text("1\n")
    address = "0000:00:04.0"
    dev = root / "sys/devices/pci0000:00" / address
    dev.mkdir(parents=True)
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    (root / "sys/bus/pci/devices" / address).symlink_to(f"../../../devices/pci0000:00/{address}")
    drv = root / "sys/bus/pci/drivers/virtio-pci"
    drv.mkdir(parents=True)
    for name in ("bind", "unbind"):
        (drv / name).write_text("")
    (dev / "driver").symlink_to("../../../bus/pci/drivers/virtio-pci")
    plan = QuiescePlan(reboot_cpu=0, offline_cpus=(1,), kept_cpus=(),
                       devices=(PlannedDevice(address, "virtio-pci", "0x00ff00", (), ()),),
                       holders=())
    writer = Kernel(str(root))
    journal = str(tmp_path / "journal.jsonl")
    execute(plan, SysRoot(str(root)), writer, journal)
    assert rollback(journal, SysRoot(str(root)), writer).ok
    return {path for path, _ in writer.log}


def below(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def test_read_write_paths_under_sys_are_exactly_what_quiesce_writes(tmp_path):
    stores = quiesce_stores(tmp_path)
    assert stores == {"/sys/devices/system/cpu/cpu1/online",
                      "/sys/bus/pci/drivers/virtio-pci/unbind",
                      "/sys/bus/pci/drivers/virtio-pci/bind"}
    opened = [p.lstrip("-") for p in unit_values("ReadWritePaths")
              if p.lstrip("-").startswith("/sys")]
    assert opened, "ProtectKernelTunables makes /sys read-only: quiesce needs some of it"
    for store in stores:
        assert any(below(store, d) for d in opened), f"{store} is not writable in the unit"
    for directory in opened:
        assert any(below(s, directory) for s in stores), f"{directory} is opened for nothing"
        # narrower than the stores' common parents would not work for other CPUs/drivers:
        # the unit cannot name cpuN or a driver, so one level above them is the floor
        assert directory in ("/sys/devices/system/cpu", "/sys/bus/pci/drivers"), directory
    assert not any(below("/sys/kernel/x", d) or d == "/sys/kernel" for d in opened)
    assert "yes" in unit_values("ProtectKernelTunables")


def test_bounding_set_keeps_what_the_holder_scan_needs():
    bounding = set(unit_values("CapabilityBoundingSet"))
    assert set(SCAN_CAPABILITIES) <= bounding, bounding
    assert {"CAP_SYS_BOOT", "CAP_SYS_ADMIN"} <= bounding


def test_exposure_stays_within_the_target():
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(UNIT)], capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for relaunchd\.service: ([\d.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= EXPOSURE_LIMIT, out.stdout


def test_systemd_analyze_verify_is_silent(tmp_path):
    # Outside a root with relaunchd installed, ExecStart= must name an existing binary.
    exe = REPO / ".venv" / "bin" / "relaunchd"
    text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={exe}", UNIT.read_text())
    unit = tmp_path / "relaunchd.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), \
        out.stdout + out.stderr
