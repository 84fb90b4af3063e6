"""Quiesce, part 1: the plan (platform layer).

`compute_plan(policy, sysroot)` turns the configuration into a `QuiescePlan` at stage time:
which CPUs to offline (never the reboot CPU, never a CPU without an `online` file), which
PCI devices to unbind from which driver, and which processes would be cut off (those holding
/dev/tpm* or a device node of a device to unbind). The plan is plain data
(`to_json`/`from_json`) so it can be written to /run/relaunchd/ and reviewed. The kernel's
kexec path already shuts devices down and stops the other CPUs (ecosystem.md §4.2); the plan
is what the configuration asks for on top.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from relaunchd.errors import InvalidArgument
from relaunchd.platform import capabilities
from relaunchd.platform.sysroot import NOT_PRESENT, PERMISSION, SysRoot

PLAN_PATH = "/run/relaunchd/quiesce-plan.json"
JOURNAL_PATH = "/run/relaunchd/quiesce-journal.jsonl"
PLAN_VERSION = 1

CPU_DIR = "/sys/devices/system/cpu"
REBOOT_CPU = "/sys/kernel/reboot/cpu"
PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"

PCI_ADDRESS = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.ASCII)
FULL_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.ASCII)
DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$", re.ASCII)
PCI_CLASS = re.compile(r"^(?:0x)?((?:[0-9a-f]{2}){1,3})$")
CPU_NAME = re.compile(r"^cpu([0-9]+)$")
TPM_NODE = re.compile(r"^/dev/tpm(?:rm)?[0-9]+$")

# Bounds for the scans (a host with a pathological number of processes or sysfs nodes must
# not turn plan computation into a stall).
MAX_PROCESSES = 65536
MAX_FDS_PER_PROCESS = 65536
MAX_DEVICE_WALK = 4096           # sysfs directories visited below one PCI device
MAX_DEVICE_DEPTH = 6

# What reading another process's open files takes beyond uid 0: listing /proc/PID/fd of a
# process with another uid is a DAC check (fs/proc/fd.c proc_fd_permission →
# generic_permission: CAP_DAC_READ_SEARCH), reading a link in it a PTRACE_MODE_READ check
# (proc_fd_access_allowed) that fails without CAP_SYS_PTRACE for every process whose
# capabilities are not a subset of ours (security/commoncap.c cap_ptrace_access_check) —
# i.e. most system daemons. units/relaunchd.service keeps both in its bounding set.
SCAN_CAPABILITIES = ("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")


# ------------------------------------------------------------------ policy and plan

@dataclass(frozen=True)
class QuiescePolicy:
    """What the configuration asks for (config.QuiesceConfig carries the same two fields)."""

    offline_cpus: str | tuple[int, ...] | list[int] = "auto"  # "auto" | "none" | CPU numbers
    unbind_devices: tuple[str, ...] | list[str] = ()  # "0000:00:03.0" | driver:X | class:0x02..

    @classmethod
    def from_config(cls, cfg: Any) -> QuiescePolicy:
        return cls(offline_cpus=cfg.offline_cpus, unbind_devices=tuple(cfg.unbind_devices))


@dataclass(frozen=True)
class PlannedDevice:
    address: str             # full PCI address, 0000:00:03.0
    driver: str              # the driver it is bound to at plan time
    pci_class: str           # "0x020000"
    selectors: tuple[str, ...]
    nodes: tuple[str, ...]   # its device nodes (/dev/...), found through sysfs uevent DEVNAME


@dataclass(frozen=True)
class KeptCpu:
    cpu: int
    reason: str


@dataclass(frozen=True)
class Holder:
    """A process that holds a device the quiesce would take away."""

    pid: int
    comm: str
    path: str                # platform path, e.g. /dev/tpm0


@dataclass(frozen=True)
class HolderScan:
    """What the holder scan found, and how many processes it could not look into."""

    holders: tuple[Holder, ...]
    uninspected: int = 0            # processes whose open files could not be read
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuiescePlan:
    reboot_cpu: int
    offline_cpus: tuple[int, ...]
    kept_cpus: tuple[KeptCpu, ...]
    devices: tuple[PlannedDevice, ...]
    holders: tuple[Holder, ...]
    notes: tuple[str, ...] = ()
    uninspected: int = 0            # processes the holder scan could not look into
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuiescePlan:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not an object")
            for key in ("offline_cpus", "kept_cpus", "devices", "holders"):
                if not isinstance(d[key], list):
                    raise TypeError(f"{key} is not a list")
            if d.get("version") != PLAN_VERSION:
                raise InvalidArgument(f"quiesce plan version {d.get('version')!r} "
                                      f"(expected {PLAN_VERSION})")
            plan = cls(
                reboot_cpu=_int(d["reboot_cpu"]),
                offline_cpus=tuple(_int(c) for c in d["offline_cpus"]),
                kept_cpus=tuple(KeptCpu(_int(k["cpu"]), str(k["reason"]))
                                for k in d["kept_cpus"]),
                devices=tuple(PlannedDevice(str(x["address"]), str(x["driver"]),
                                            str(x["pci_class"]),
                                            tuple(str(s) for s in _list(x["selectors"])),
                                            tuple(str(n) for n in _list(x["nodes"])))
                              for x in d["devices"]),
                holders=tuple(Holder(_int(h["pid"]), str(h["comm"]), str(h["path"]))
                              for h in d["holders"]),
                notes=tuple(str(n) for n in d.get("notes", ())),
                uninspected=_int(d.get("uninspected", 0)),
            )
        except InvalidArgument:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidArgument(f"malformed quiesce plan: {exc}") from exc
        for cpu in plan.offline_cpus:
            if cpu < 0 or cpu == plan.reboot_cpu:
                raise InvalidArgument(f"quiesce plan would offline CPU {cpu}")
        for dev in plan.devices:
            check_address(dev.address)
            check_driver(dev.driver)
        return plan


def _int(value: Any) -> int:
    """A JSON integer only: int() would also take "٣" (3) or true (1)."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, not {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return value


def check_address(address: str) -> str:
    # fullmatch: `$` would also match before a trailing newline
    if not FULL_PCI_ADDRESS.fullmatch(address):
        raise InvalidArgument(f"not a PCI address: {address!r}")
    return address


def check_driver(driver: str) -> str:
    if not DRIVER_NAME.fullmatch(driver) or driver in (".", ".."):
        raise InvalidArgument(f"not a driver name: {driver!r}")
    return driver


def cpu_online_path(cpu: int) -> str:
    return f"{CPU_DIR}/cpu{cpu}/online"


# ------------------------------------------------------------------ platform facts

def reboot_cpu(sysroot: SysRoot) -> int:
    r = sysroot.read_int(REBOOT_CPU, base=10)
    return r.value if r.ok and r.value is not None and r.value >= 0 else 0


def cpu_states(sysroot: SysRoot) -> dict[int, bool | None]:
    """CPU number → True (online), False (offline), None (no `online` file: not hotpluggable)."""
    listing = sysroot.listdir(CPU_DIR)
    states: dict[int, bool | None] = {}
    for name in listing.value or ():
        m = CPU_NAME.match(name)
        if not m:
            continue
        cpu = int(m.group(1))
        r = sysroot.read_line(cpu_online_path(cpu))
        if not r.ok and not sysroot.exists(cpu_online_path(cpu)):
            states[cpu] = None
        else:
            states[cpu] = r.value != "0"   # unreadable counts as online: never assume it is off
    return states


def current_driver(sysroot: SysRoot, address: str) -> str | None:
    r = sysroot.readlink(f"{PCI_DEVICES}/{address}/driver")
    return os.path.basename(r.value.rstrip("/")) if r.ok and r.value else None


def _device_nodes(sysroot: SysRoot, address: str) -> tuple[str, ...]:
    """Device nodes below a PCI device: every `uevent` with DEVNAME= in its sysfs subtree.

    Walks real directories only (sysfs links such as `driver`, `subsystem`, `firmware_node`
    would lead out of the device), bounded in depth and in directories visited.
    """
    base = sysroot.host_path(f"{PCI_DEVICES}/{address}")
    nodes: list[str] = []
    stack = [(os.path.realpath(base), 0)]
    visited = 0
    while stack and visited < MAX_DEVICE_WALK:
        here, depth = stack.pop()
        visited += 1
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            if entry.name == "uevent" and entry.is_file(follow_symlinks=False):
                try:
                    with open(entry.path, encoding="utf-8", errors="replace") as f:
                        text = f.read(4096)
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("DEVNAME="):
                        name = os.path.normpath("/dev/" + line[len("DEVNAME="):].strip())
                        if name.startswith("/dev/"):
                            nodes.append(name)
            elif (depth < MAX_DEVICE_DEPTH and entry.is_dir(follow_symlinks=False)):
                stack.append((entry.path, depth + 1))
    return tuple(sorted(set(nodes)))


def _platform_target(sysroot: SysRoot, target: str) -> str:
    """A /proc/PID/fd link target as a platform path (strip the fixture root)."""
    target = target.removesuffix(" (deleted)")
    if sysroot.root != "/":
        for root in {sysroot.root, os.path.realpath(sysroot.root)}:
            if target.startswith(root + "/"):
                return target[len(root):]
    return target


def scan_holders(sysroot: SysRoot, nodes: set[str], *, tpm: bool = True,
                 exclude: set[int] | None = None,
                 max_processes: int = MAX_PROCESSES) -> HolderScan:
    """Processes with an open fd on one of `nodes` (or on /dev/tpm*), via <root>/proc/PID/fd.

    Processes come and go during the scan: one that vanished is skipped. One whose fd
    directory or fd links are refused is counted in `uninspected`, and a note says how many
    and which capability this process lacks for them — a holder there is invisible, so
    "no holders" must never be read as "nobody holds it".
    """
    exclude = {os.getpid()} if exclude is None else exclude
    notes: list[str] = []
    pids = sorted(int(n) for n in (sysroot.listdir("/proc").value or ()) if n.isdigit())
    if len(pids) > max_processes:
        notes.append(f"process scan stopped after {max_processes} of {len(pids)} processes")
        pids = pids[:max_processes]
    uninspected = 0
    holders: set[Holder] = set()
    for pid in pids:
        if pid in exclude:
            continue
        fds = sysroot.listdir(f"/proc/{pid}/fd")
        if not fds.ok:
            if fds.error != NOT_PRESENT:   # vanished: not interesting
                uninspected += 1
            continue
        refused = False
        for fd in (fds.value or ())[:MAX_FDS_PER_PROCESS]:
            link = sysroot.readlink(f"/proc/{pid}/fd/{fd}")
            if not link.ok or not link.value:
                refused = refused or link.error == PERMISSION
                continue
            path = _platform_target(sysroot, link.value)
            if path in nodes or (tpm and TPM_NODE.match(path)):
                comm = sysroot.read_line(f"/proc/{pid}/comm")
                holders.add(Holder(pid, comm.value if comm.ok and comm.value else "?", path))
        uninspected += refused
    if uninspected:
        notes.append(uninspected_note(uninspected))
    return HolderScan(tuple(sorted(holders, key=lambda h: (h.path, h.pid))), uninspected,
                      tuple(notes))


def uninspected_note(count: int) -> str:
    """"could not inspect N processes: missing CAP_SYS_PTRACE" (or why else)."""
    what = f"could not inspect {count} process{'es' if count != 1 else ''}"
    lacking = capabilities.missing(SCAN_CAPABILITIES)
    if lacking:
        return f"{what}: missing {' and '.join(lacking)}"
    if lacking is None:
        return f"{what} (reading /proc/PID/fd needs {' and '.join(SCAN_CAPABILITIES)})"
    return f"{what}: their open files are not readable"


def find_holders(sysroot: SysRoot, nodes: set[str], *, tpm: bool = True,
                 exclude: set[int] | None = None,
                 max_processes: int = MAX_PROCESSES) -> tuple[tuple[Holder, ...], list[str]]:
    """`scan_holders` as (holders, notes)."""
    scan = scan_holders(sysroot, nodes, tpm=tpm, exclude=exclude, max_processes=max_processes)
    return scan.holders, list(scan.notes)


# ------------------------------------------------------------------ plan computation

def _resolve_selector(selector: str) -> tuple[str, str]:
    kind, sep, rest = selector.partition(":")
    if sep and kind == "driver":
        return "driver", check_driver(rest)
    if sep and kind == "class":
        m = PCI_CLASS.match(rest.lower())
        if not m:
            raise InvalidArgument(f"unknown device selector {selector!r}: a PCI class is 2, 4 "
                                  "or 6 hex digits (class:0x0200)")
        return "class", m.group(1)
    address = selector.lower()
    if not PCI_ADDRESS.match(address):
        raise InvalidArgument(f"unknown device selector {selector!r}: expected a PCI address "
                              "(0000:03:00.0), driver:NAME or class:HEX")
    return "address", address if FULL_PCI_ADDRESS.match(address) else "0000:" + address


def _plan_cpus(policy: QuiescePolicy, sysroot: SysRoot, boot: int,
               notes: list[str]) -> tuple[tuple[int, ...], tuple[KeptCpu, ...]]:
    states = cpu_states(sysroot)
    kept: list[KeptCpu] = []
    wanted: list[int]
    if policy.offline_cpus == "none":
        return (), ()
    if policy.offline_cpus == "auto":
        wanted = sorted(states)
    elif isinstance(policy.offline_cpus, str):
        raise InvalidArgument(f"offline_cpus must be auto, none or a list of CPUs, "
                              f"not {policy.offline_cpus!r}")
    else:
        wanted = sorted(set(policy.offline_cpus))
        missing = [c for c in wanted if c not in states]
        if missing:
            raise InvalidArgument(f"offline_cpus names CPU {missing[0]}, which this machine "
                                  "does not have")
    chosen: list[int] = []
    for cpu in wanted:
        state = states[cpu]
        if cpu == boot:
            kept.append(KeptCpu(cpu, "reboot CPU"))
        elif state is None:
            kept.append(KeptCpu(cpu, "cannot be offlined (no online file)"))
        elif state is False:
            notes.append(f"CPU {cpu} is already offline")
        else:
            chosen.append(cpu)
    return tuple(chosen), tuple(kept)


def _plan_devices(policy: QuiescePolicy, sysroot: SysRoot,
                  notes: list[str]) -> tuple[PlannedDevice, ...]:
    selectors = [(s, *_resolve_selector(s)) for s in policy.unbind_devices]
    if not selectors:
        return ()
    present: dict[str, tuple[str | None, str]] = {}
    for address in sysroot.listdir(PCI_DEVICES).value or ():
        if not FULL_PCI_ADDRESS.match(address):
            continue
        cls = sysroot.read_line(f"{PCI_DEVICES}/{address}/class")
        pci_class = (cls.value or "").lower() if cls.ok else ""
        present[address] = (current_driver(sysroot, address), pci_class)
    matched: dict[str, list[str]] = {}
    for selector, kind, value in selectors:
        hits = []
        for address, (driver, pci_class) in present.items():
            if ((kind == "address" and address == value)
                    or (kind == "driver" and driver == value)
                    or (kind == "class" and pci_class.removeprefix("0x").startswith(value))):
                hits.append(address)
        if kind == "address" and not hits:
            raise InvalidArgument(f"no PCI device {value} (selector {selector!r})")
        if not hits:
            notes.append(f"selector {selector!r} matches no device")
        for address in hits:
            matched.setdefault(address, []).append(selector)
    devices = []
    for address in sorted(matched):
        driver, pci_class = present[address]
        if driver is None:
            notes.append(f"{address} has no driver bound; nothing to unbind")
            continue
        devices.append(PlannedDevice(address, check_driver(driver), pci_class,
                                     tuple(matched[address]), _device_nodes(sysroot, address)))
    return tuple(devices)


def compute_plan(policy: QuiescePolicy, sysroot: SysRoot, *,
                 exclude_pids: set[int] | None = None) -> QuiescePlan:
    """The quiesce plan for this platform (raises InvalidArgument for a bad policy)."""
    notes: list[str] = []
    boot = reboot_cpu(sysroot)
    cpus, kept = _plan_cpus(policy, sysroot, boot, notes)
    devices = _plan_devices(policy, sysroot, notes)
    nodes = {n for d in devices for n in d.nodes}
    scan = scan_holders(sysroot, nodes, exclude=exclude_pids)
    return QuiescePlan(boot, cpus, kept, devices, scan.holders, (*notes, *scan.notes),
                       uninspected=scan.uninspected)
