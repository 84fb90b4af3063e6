"""Proving a relaunch after the new boot (engine layer): pending record + facts → verdict.

The daemon that starts after a hand-off finds `pending.json` and asks: is this the boot
that was staged? Each check that fails adds one human-readable line to `mismatches`,
and the relaunch is `verified` only when there are none:

- the boot id changed (the machine did boot again);
- /proc/cmdline is exactly the staged command line, which carries `relaunchd.id=<id>`
  — the one fact only the staged image can bring along (a firmware reboot comes back
  with the boot loader's command line);
- when measured: the TPM was not reset in between (a kexec keeps the TPM's reset
  counter, a firmware reboot increments it) and relaunchd's log replays to the PCR;
- with a DRTM method: Secure Launch's securityfs is there and PCRs 17/18 left their
  reset state (drtm.md §3.4, §4.1).

Downtime is the hand-off to the moment the facts were read (this daemon starting);
the kernel's start time (whole seconds, from /proc/stat btime) splits it into
"going down + kexec" and "new kernel + userspace up to relaunchd". Both ends are wall
clock: after a kexec the new kernel reads the RTC again, so the split is ±1 s.
"""

from __future__ import annotations

from typing import Any

from .host import BootFacts
from .measured import Verdict
from .state import PendingRecord, now

DRTM_METHODS = ("txt", "skinit")


def evaluate(pending: PendingRecord, facts: BootFacts, *, verdict: Verdict | None,
             reset_count: int | None, measurement_error: str | None = None) -> dict[str, Any]:
    """The LastRelaunch record for the boot described by `facts`."""
    mismatches: list[str] = []
    if facts.boot_id is None:
        mismatches.append("the boot id is unreadable")
    elif facts.boot_id == pending.boot_id:
        mismatches.append("the boot id did not change: no new boot")

    running = (facts.cmdline or "").strip()
    cmdline_ok = facts.cmdline is not None and running == pending.cmdline.strip()
    if not cmdline_ok:
        mismatches.append(f"/proc/cmdline is {running!r}, the staged command line is "
                          f"{pending.cmdline.strip()!r}")

    measurement = dict(pending.measurement)
    measured = bool(measurement.get("measured"))
    if measured:
        before = measurement.get("reset_count")
        if measurement_error is not None:
            mismatches.append(f"the measurement cannot be checked: {measurement_error}")
        elif reset_count is not None and before is not None and reset_count != before:
            mismatches.append(f"the TPM was reset since the hand-off (reset count {before} → "
                              f"{reset_count}): the machine rebooted through firmware")
        elif verdict is not None and not verdict.ok:
            mismatches.extend(verdict.mismatches)

    drtm_method = pending.method in DRTM_METHODS
    drtm = False
    if drtm_method:
        pcrs = facts.drtm_pcrs
        if not facts.slaunch:
            mismatches.append("no Secure Launch in this boot (/sys/kernel/security/slaunch "
                              "is missing)")
        if "error" in pcrs:
            mismatches.append(f"PCRs 17/18 unreadable: {pcrs['error']}")
        elif pcrs.get("reset_state", True):
            mismatches.append("PCRs 17/18 are in their reset state: no dynamic launch")
        drtm = facts.slaunch and not pcrs.get("reset_state", True) and "error" not in pcrs

    handed_off = float(pending.handoff_at) if pending.handoff_at else None
    downtime_ms = phases = None
    if handed_off is not None and facts.now >= handed_off:
        downtime_ms = round((facts.now - handed_off) * 1000)
        if facts.kernel_started is not None and handed_off <= facts.kernel_started <= facts.now:
            phases = {"down_ms": round((facts.kernel_started - handed_off) * 1000),
                      "up_ms": round((facts.now - facts.kernel_started) * 1000)}

    return {
        "id": pending.id,
        "image": pending.path,
        "method": pending.method,
        "loader": pending.loader,
        "handoff": pending.handoff,
        "time": pending.time,
        "concluded_at": now(),
        "boot_id": facts.boot_id or "",
        "previous_boot_id": pending.boot_id or "",
        "cmdline": running,
        "cmdline_matches": cmdline_ok,
        "drtm": drtm,
        "measured": measured,
        "measurement": {**measurement, **({"verdict": {
            "ok": verdict.ok, "expected": verdict.expected, "actual": verdict.actual}}
            if verdict is not None else {})},
        "verified": not mismatches,
        "mismatches": mismatches,
        "downtime_ms": downtime_ms,
        "phases": phases or {},
    }
