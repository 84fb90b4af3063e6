"""Quiesce, part 3: executing a plan, rolling it back, rehearsing it (platform layer).

- `execute(plan, ...)` performs the plan, journaling each action before its store; on any
  failure the journal is replayed backwards and `QuiesceFailed` names the step.
- `rollback(journal, ...)` restores exactly what the journal says was changed, in reverse
  order; every inverse looks at the current state first, so it is idempotent and also right
  after a crash between a journal entry and its store. It works from the file alone, so a
  restarted daemon can undo a quiesce its predecessor began.
- `rehearse(plan, ...)` executes, checks the quiesced state, rolls back and checks that
  everything is as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from relaunchd.errors import InvalidArgument, QuiesceFailed
from relaunchd.platform.quiesce.journal import (
    CPU_OFFLINE,
    DRIVER_UNBIND,
    ROLLED_BACK,
    Journal,
    JournalEntry,
)
from relaunchd.platform.quiesce.plan import (
    PCI_DRIVERS,
    QuiescePlan,
    check_address,
    check_driver,
    cpu_online_path,
    cpu_states,
    current_driver,
)
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter


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
    r = sysroot.read_line(cpu_online_path(cpu))
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
            state = sysroot.read_line(cpu_online_path(cpu))
            if state.ok and state.value == "0":
                report.skipped.append(f"CPU {cpu} already offline")
                continue
            if not state.ok:
                raise OSError(f"cannot read {state.path}: {state.detail or state.error}")
            entry = JournalEntry(CPU_OFFLINE, str(cpu), state.value or "1")
            journal.append(entry)
            writer.write(cpu_online_path(cpu), "0")
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
            entry = JournalEntry(DRIVER_UNBIND, dev.address, check_driver(driver))
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
        writer.write(cpu_online_path(cpu), "1")
        if not _verify_cpu(sysroot, cpu, online=True):
            raise OSError(f"CPU {cpu} still offline after the store")
        report.restored.append(what)
    elif entry.action == DRIVER_UNBIND:
        address = check_address(entry.target)
        driver = check_driver(entry.previous)
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
    """Undo every journaled action, newest first; never stops at one bad entry.

    An entry the journal rejected (journal.entry_problem) cannot be undone by relaunchd at
    all: it is reported in `failed`, by line, once. The rolled-back marker is appended when
    every entry that *can* be undone was, so such a line does not refuse every later
    quiesce; an entry whose undo failed keeps the journal pending for the next rollback.
    """
    journal = Journal(journal_path)
    contents = journal.read()
    report = RollbackReport()
    report.failed += [f"journal line {line}: {why}; not rolled back (check it by hand)"
                      for line, why in contents.rejected]
    undo_failed = False
    for entry in reversed(contents.entries):
        try:
            _undo(entry, sysroot, writer, report)
        except Exception as exc:   # whatever one entry raises, the others are still undone
            report.failed.append(f"{entry.action} {entry.target}: {exc}")
            undo_failed = True
    if contents.pending and not undo_failed:
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
