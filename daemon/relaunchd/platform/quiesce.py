"""Quiesce: offline APs and unbind devices before a relaunch, with a rollback journal.

Platform layer. The kernel's kexec path already shuts devices down and stops the other
CPUs (ecosystem.md §4.2); what we add is what the configuration asks for on top, done in
a way that can always be undone:

- `compute_plan(policy, sysroot)` turns the configuration into a `QuiescePlan` at stage
  time: which CPUs to offline (never the reboot CPU, never a CPU without an `online` file),
  which PCI devices to unbind from which driver, and which processes would be cut off (those
  holding /dev/tpm* or a device node of a device to unbind). The plan is plain data
  (`to_json`/`from_json`) so it can be written to /run/relaunchd/ and reviewed.
- `execute(plan, ...)` performs it. Every action is appended to a journal file and fsynced
  *before* the store that performs it, with the value it changes (ecosystem.md §4.4). On any
  failure the journal is replayed backwards and `QuiesceFailed` names the step.
- `rollback(journal, ...)` restores exactly what the journal says was changed, in reverse
  order; every inverse looks at the current state first, so it is idempotent and also right
  after a crash between a journal entry and its store. It works from the file alone, so a
  restarted daemon can undo a quiesce its predecessor began.
- `rehearse(plan, ...)` executes, checks the quiesced state, rolls back and checks that
  everything is as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from relaunchd.errors import InvalidArgument, QuiesceFailed
from relaunchd.platform.atomic_file import fsync_dir
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter

PLAN_PATH = "/run/relaunchd/quiesce-plan.json"
JOURNAL_PATH = "/run/relaunchd/quiesce-journal.jsonl"
PLAN_VERSION = 1

CPU_DIR = "/sys/devices/system/cpu"
REBOOT_CPU = "/sys/kernel/reboot/cpu"
PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"

PCI_ADDRESS = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
FULL_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PCI_CLASS = re.compile(r"^(?:0x)?((?:[0-9a-f]{2}){1,3})$")
CPU_NAME = re.compile(r"^cpu([0-9]+)$")
TPM_NODE = re.compile(r"^/dev/tpm(?:rm)?[0-9]+$")

# Actions in the journal. Each names its inverse in `_undo`.
CPU_OFFLINE = "cpu-offline"
DRIVER_UNBIND = "driver-unbind"
ROLLED_BACK = "rolled-back"      # marker: everything above it has been undone

# Bounds for the scans (a host with a pathological number of processes or sysfs nodes must
# not turn plan computation into a stall).
MAX_PROCESSES = 65536
MAX_FDS_PER_PROCESS = 65536
MAX_DEVICE_WALK = 4096           # sysfs directories visited below one PCI device
MAX_DEVICE_DEPTH = 6


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
class QuiescePlan:
    reboot_cpu: int
    offline_cpus: tuple[int, ...]
    kept_cpus: tuple[KeptCpu, ...]
    devices: tuple[PlannedDevice, ...]
    holders: tuple[Holder, ...]
    notes: tuple[str, ...] = ()
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
                reboot_cpu=int(d["reboot_cpu"]),
                offline_cpus=tuple(int(c) for c in d["offline_cpus"]),
                kept_cpus=tuple(KeptCpu(int(k["cpu"]), str(k["reason"]))
                                for k in d["kept_cpus"]),
                devices=tuple(PlannedDevice(str(x["address"]), str(x["driver"]),
                                            str(x["pci_class"]),
                                            tuple(str(s) for s in _list(x["selectors"])),
                                            tuple(str(n) for n in _list(x["nodes"])))
                              for x in d["devices"]),
                holders=tuple(Holder(int(h["pid"]), str(h["comm"]), str(h["path"]))
                              for h in d["holders"]),
                notes=tuple(str(n) for n in d.get("notes", ())),
            )
        except InvalidArgument:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidArgument(f"malformed quiesce plan: {exc}") from exc
        for cpu in plan.offline_cpus:
            if cpu < 0 or cpu == plan.reboot_cpu:
                raise InvalidArgument(f"quiesce plan would offline CPU {cpu}")
        for dev in plan.devices:
            _check_address(dev.address)
            _check_driver(dev.driver)
        return plan


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return value


def _check_address(address: str) -> str:
    if not FULL_PCI_ADDRESS.match(address):
        raise InvalidArgument(f"not a PCI address: {address!r}")
    return address


def _check_driver(driver: str) -> str:
    if not DRIVER_NAME.match(driver) or driver in (".", ".."):
        raise InvalidArgument(f"not a driver name: {driver!r}")
    return driver


def _cpu_online_path(cpu: int) -> str:
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
        r = sysroot.read_line(_cpu_online_path(cpu))
        if not r.ok and not sysroot.exists(_cpu_online_path(cpu)):
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


def find_holders(sysroot: SysRoot, nodes: set[str], *, tpm: bool = True,
                 exclude: set[int] | None = None,
                 max_processes: int = MAX_PROCESSES) -> tuple[tuple[Holder, ...], list[str]]:
    """Processes with an open fd on one of `nodes` (or on /dev/tpm*), via <root>/proc/PID/fd.

    Processes come and go during the scan and some fds are not ours to read: every such
    case is skipped, never an error. Returns the holders and notes on what could not be seen.
    """
    exclude = {os.getpid()} if exclude is None else exclude
    notes: list[str] = []
    pids = sorted(int(n) for n in (sysroot.listdir("/proc").value or ()) if n.isdigit())
    if len(pids) > max_processes:
        notes.append(f"process scan stopped after {max_processes} of {len(pids)} processes")
        pids = pids[:max_processes]
    unreadable = 0
    holders: set[Holder] = set()
    for pid in pids:
        if pid in exclude:
            continue
        fds = sysroot.listdir(f"/proc/{pid}/fd")
        if not fds.ok:
            if fds.error != "not-present":   # vanished: not interesting
                unreadable += 1
            continue
        for fd in (fds.value or ())[:MAX_FDS_PER_PROCESS]:
            link = sysroot.readlink(f"/proc/{pid}/fd/{fd}")
            if not link.ok or not link.value:
                continue
            path = _platform_target(sysroot, link.value)
            if path in nodes or (tpm and TPM_NODE.match(path)):
                comm = sysroot.read_line(f"/proc/{pid}/comm")
                holders.add(Holder(pid, comm.value if comm.ok and comm.value else "?", path))
    if unreadable:
        notes.append(f"open files of {unreadable} processes could not be read")
    return tuple(sorted(holders, key=lambda h: (h.path, h.pid))), notes


# ------------------------------------------------------------------ plan computation

def _resolve_selector(selector: str) -> tuple[str, str]:
    kind, sep, rest = selector.partition(":")
    if sep and kind == "driver":
        return "driver", _check_driver(rest)
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
        devices.append(PlannedDevice(address, _check_driver(driver), pci_class,
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
    holders, scan_notes = find_holders(sysroot, nodes, exclude=exclude_pids)
    return QuiescePlan(boot, cpus, kept, devices, holders, tuple(notes + scan_notes))


# ------------------------------------------------------------------ the journal

@dataclass(frozen=True)
class JournalEntry:
    action: str
    target: str
    previous: str

    def to_line(self) -> bytes:
        return (json.dumps({"action": self.action, "target": self.target,
                            "previous": self.previous}, sort_keys=True) + "\n").encode()


class Journal:
    """Append-only, fsynced-per-entry action journal (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> tuple[list[JournalEntry], list[str]]:
        """Entries not yet rolled back, and notes on lines that could not be used."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise QuiesceFailed(f"cannot read quiesce journal {self.path}: {exc}") from exc
        entries: list[JournalEntry] = []
        notes: list[str] = []
        last = len(lines) - 1
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
                entry = JournalEntry(str(d["action"]), str(d["target"]), str(d["previous"]))
            except (ValueError, KeyError, TypeError):
                # A torn last line is an entry whose store never started (the entry is
                # fsynced before the store): nothing to undo.
                if i != last:
                    notes.append(f"journal line {i + 1} unreadable; skipped")
                continue
            if entry.action == ROLLED_BACK:
                entries = []
            else:
                entries.append(entry)
        return entries, notes

    def open_for_execute(self) -> None:
        pending, _ = self.read()
        if pending:
            raise QuiesceFailed(f"quiesce journal {self.path} holds {len(pending)} actions "
                                "that were not rolled back; roll it back first")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def append(self, entry: JournalEntry) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            data = entry.to_line()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)



# ------------------------------------------------------------------ execution and rollback

@dataclass
class RollbackReport:
    restored: list[str] = field(default_factory=list)   # "cpu 3 online", "0000:00:03.0 → e1000e"
    already: list[str] = field(default_factory=list)    # inverse not needed (state as before)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class ExecuteReport:
    done: list[JournalEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _verify_cpu(sysroot: SysRoot, cpu: int, online: bool) -> bool:
    r = sysroot.read_line(_cpu_online_path(cpu))
    return r.ok and r.value == ("1" if online else "0")


def execute(plan: QuiescePlan, sysroot: SysRoot, writer: SysWriter,
            journal_path: str) -> ExecuteReport:
    """Perform `plan`; on any failure roll back and raise QuiesceFailed."""
    if os.path.abspath(writer.root) != sysroot.root:
        raise InvalidArgument("reader and writer must share one root")
    journal = Journal(journal_path)
    journal.open_for_execute()
    report = ExecuteReport()
    step = ""
    try:
        for cpu in plan.offline_cpus:
            step = f"offline CPU {cpu}"
            state = sysroot.read_line(_cpu_online_path(cpu))
            if state.ok and state.value == "0":
                report.skipped.append(f"CPU {cpu} already offline")
                continue
            if not state.ok:
                raise OSError(f"cannot read {state.path}: {state.detail or state.error}")
            entry = JournalEntry(CPU_OFFLINE, str(cpu), state.value or "1")
            journal.append(entry)
            writer.write(_cpu_online_path(cpu), "0")
            if not _verify_cpu(sysroot, cpu, online=False):
                raise OSError(f"CPU {cpu} still online after the store")
            report.done.append(entry)
        for dev in plan.devices:
            step = f"unbind {dev.address}"
            driver = current_driver(sysroot, dev.address)
            if driver is None:
                report.skipped.append(f"{dev.address} has no driver bound")
                continue
            # Unbind from whatever it is bound to now; the journal records that driver, so
            # the rollback restores the state we changed, not the state at plan time.
            entry = JournalEntry(DRIVER_UNBIND, dev.address, _check_driver(driver))
            journal.append(entry)
            writer.write(f"{PCI_DRIVERS}/{driver}/unbind", dev.address)
            if current_driver(sysroot, dev.address) is not None:
                raise OSError(f"{dev.address} still bound after the store")
            report.done.append(entry)
    except (OSError, InvalidArgument) as exc:
        rb = rollback(journal_path, sysroot, writer)
        outcome = ("rolled back" if rb.ok else
                   "ROLLBACK INCOMPLETE: " + "; ".join(rb.failed))
        raise QuiesceFailed(f"{step} failed: {exc}; {outcome}") from exc
    return report


def _undo(entry: JournalEntry, sysroot: SysRoot, writer: SysWriter,
          report: RollbackReport) -> None:
    if entry.action == CPU_OFFLINE:
        cpu = int(entry.target)
        what = f"CPU {cpu} online"
        if entry.previous != "1":
            report.already.append(f"CPU {cpu} was {entry.previous!r}; left alone")
            return
        if _verify_cpu(sysroot, cpu, online=True):
            report.already.append(what)
            return
        writer.write(_cpu_online_path(cpu), "1")
        if not _verify_cpu(sysroot, cpu, online=True):
            raise OSError(f"CPU {cpu} still offline after the store")
        report.restored.append(what)
    elif entry.action == DRIVER_UNBIND:
        address = _check_address(entry.target)
        driver = _check_driver(entry.previous)
        what = f"{address} bound to {driver}"
        now = current_driver(sysroot, address)
        if now == driver:
            report.already.append(what)
            return
        if now is not None:
            raise OSError(f"{address} is bound to {now}, not {driver}")
        writer.write(f"{PCI_DRIVERS}/{driver}/bind", address)
        if current_driver(sysroot, address) != driver:
            raise OSError(f"{address} not bound to {driver} after the store")
        report.restored.append(what)
    else:
        raise InvalidArgument(f"unknown journal action {entry.action!r}")


def rollback(journal_path: str, sysroot: SysRoot, writer: SysWriter) -> RollbackReport:
    """Undo every journaled action, newest first; never stops at the first failure."""
    journal = Journal(journal_path)
    entries, notes = journal.read()
    report = RollbackReport(notes=notes)
    for entry in reversed(entries):
        try:
            if entry.action == CPU_OFFLINE and not entry.target.isdigit():
                raise InvalidArgument(f"bad CPU {entry.target!r}")
            _undo(entry, sysroot, writer, report)
        except (OSError, InvalidArgument) as exc:
            report.failed.append(f"{entry.action} {entry.target}: {exc}")
    if entries and report.ok:
        journal.append(JournalEntry(ROLLED_BACK, "", ""))
    return report


# ------------------------------------------------------------------ rehearsal

@dataclass(frozen=True)
class Snapshot:
    cpus: tuple[tuple[int, bool | None], ...]
    drivers: tuple[tuple[str, str | None], ...]


def snapshot(plan: QuiescePlan, sysroot: SysRoot) -> Snapshot:
    states = cpu_states(sysroot)
    return Snapshot(tuple(sorted(states.items())),
                    tuple((d.address, current_driver(sysroot, d.address)) for d in plan.devices))


@dataclass
class RehearsalReport:
    executed: list[JournalEntry]
    quiesced_ok: bool
    restored_ok: bool
    mismatches: list[str]
    rollback: RollbackReport

    @property
    def ok(self) -> bool:
        return self.quiesced_ok and self.restored_ok and self.rollback.ok


def rehearse(plan: QuiescePlan, sysroot: SysRoot, writer: SysWriter,
             journal_path: str) -> RehearsalReport:
    """Quiesce, check, roll back, check everything is as before (QuiesceFailed if a step fails)."""
    before = snapshot(plan, sysroot)
    done = execute(plan, sysroot, writer, journal_path)
    mismatches: list[str] = []
    for cpu in plan.offline_cpus:
        if not _verify_cpu(sysroot, cpu, online=False):
            mismatches.append(f"CPU {cpu} not offline while quiesced")
    for dev in plan.devices:
        if current_driver(sysroot, dev.address) is not None:
            mismatches.append(f"{dev.address} still bound while quiesced")
    quiesced_ok = not mismatches
    rb = rollback(journal_path, sysroot, writer)
    after = snapshot(plan, sysroot)
    restored_ok = after == before
    if not restored_ok:
        for (cpu, a), (_, b) in zip(before.cpus, after.cpus, strict=False):
            if a != b:
                mismatches.append(f"CPU {cpu}: was {a}, now {b}")
        for (addr, a), (_, b) in zip(before.drivers, after.drivers, strict=False):
            if a != b:
                mismatches.append(f"{addr}: was bound to {a}, now {b}")
    return RehearsalReport(done.done, quiesced_ok, restored_ok, mismatches, rb)
