"""Quiesce: offline APs and unbind devices before a relaunch, with a rollback journal
(platform layer). `plan`: what the configuration asks for, computed at stage time;
`journal`: every action written down before it is done; `execute`: doing it, undoing it,
rehearsing it. The names callers use are re-exported here."""

from relaunchd.platform.quiesce.execute import (
    ExecuteReport,
    RehearsalReport,
    RollbackReport,
    Snapshot,
    execute,
    rehearse,
    rollback,
    snapshot,
)
from relaunchd.platform.quiesce.journal import (
    CPU_OFFLINE,
    DRIVER_UNBIND,
    ROLLED_BACK,
    Journal,
    JournalEntry,
)
from relaunchd.platform.quiesce.plan import (
    Holder,
    HolderScan,
    KeptCpu,
    PlannedDevice,
    QuiescePlan,
    QuiescePolicy,
    compute_plan,
    cpu_states,
    current_driver,
    find_holders,
    reboot_cpu,
    scan_holders,
)

__all__ = [
    "CPU_OFFLINE", "DRIVER_UNBIND", "ROLLED_BACK", "ExecuteReport", "Holder", "HolderScan",
    "Journal", "JournalEntry", "KeptCpu", "PlannedDevice", "QuiescePlan", "QuiescePolicy",
    "RehearsalReport", "RollbackReport", "Snapshot", "compute_plan", "cpu_states",
    "current_driver", "execute", "find_holders", "reboot_cpu", "rehearse", "rollback",
    "scan_holders", "snapshot",
]
