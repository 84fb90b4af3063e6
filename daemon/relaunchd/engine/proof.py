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
- with a DRTM method: Secure Launch's securityfs is there, PCRs 17/18 left their
  reset state (drtm.md §3.4, §4.1), the DRTM event log replays to PCRs 17 and 18, and
  the events relaunchd's SLRT policy predicted at staging (kernel, initrd, command
  line, INTEL_INFO into the sealing PCR; docs/slrt-policy.md) are in it with the
  predicted digests, in order. SINIT's own events and MLE_HASH are not predicted
  (drtm.md §4.5: they need a log of an earlier launch on the same machine), so the
  proof of the whole PCR 17 value is the replay, not a precomputed number.

Downtime is the hand-off to the moment the facts were read (this daemon starting);
the kernel's start time (whole seconds, from /proc/stat btime) splits it into
"going down + kexec" and "new kernel + userspace up to relaunchd". Both ends are wall
clock: after a kexec the new kernel reads the RTC again, so the split is ±1 s.

The firmware time avoided (`firmware_time`, docs/fleet.md "Seconds saved") is read in the
new boot: after a kexec the ACPI FPDT and systemd-boot's variables still describe the
cold boot this system descends from, which the relaunch did not go through again, so
`avoided_usec` is that boot's firmware + boot loader time (None when unknown). A boot
that came through firmware avoided nothing: the fallback reboot, a TPM whose reset
counter moved, a dynamic launch that reset the machine (0, with the reason). A boot that
is not the staged kernel (/proc/cmdline differs) may or may not have: None, with why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from relaunchd.engine import state
from relaunchd.engine.config import Config
from relaunchd.engine.journal_ids import MESSAGE_IDS
from relaunchd.engine.last_error import error_json
from relaunchd.engine.machine import BootFacts, Machine
from relaunchd.engine.relaunch import FALLBACK_HANDOFF, log_path
from relaunchd.engine.state import PendingRecord, now
from relaunchd.errors import InvalidEventLog, NoTpm, RelaunchAborted, RelaunchError
from relaunchd.formats import eventlog
from relaunchd.formats.firmware_time import UNKNOWN, FirmwareTime
from relaunchd.formats.slrt import SL_EVTYPE_SECURE_LAUNCH
from relaunchd.launch import registry
from relaunchd.platform import txt_registers
from relaunchd.platform.tpm import DRTM_LAUNCH_PCRS
from relaunchd.platform.tpm_extend_log import ReplayResult

if TYPE_CHECKING:
    from relaunchd.engine.core import Engine

log = logging.getLogger("relaunchd.engine")


class AfterBootProof:
    """At the daemon's start: settle a pending relaunch record."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def conclude_pending(self) -> None:
        """At start: a pending relaunch either led to this boot (prove it) or never got
        away (the daemon was killed or systemd did not go through with it)."""
        engine = self.engine
        pending = engine.store.load_pending()
        if pending is None:
            return
        boot_id = engine.machine.boot_id()
        if pending.boot_id is not None and boot_id == pending.boot_id:
            # A fallback reboot extends nothing; any other hand-off may have extended
            # before the daemon was killed (its record may not say so yet).
            extended = pending.handoff != FALLBACK_HANDOFF \
                and pending.measurement.get("measured") is not False
            dropped = recover_measurement(engine.config, engine.machine, pending) \
                if extended else 0
            rolled = None
            if pending.handoff == "immediate":
                try:
                    rolled = engine.machine.rollback(
                        engine.store.runtime_path(state.QUIESCE_JOURNAL))
                except Exception as exc:
                    log.error("cannot roll back the quiesce of relaunch %s: %s", pending.id,
                              exc)
            engine.store.clear_pending()
            engine.store.clear_runtime(state.HANDOFF)
            why = (f"relaunch {pending.id} did not happen: relaunchd restarted in the boot "
                   "that requested it (killed before the hand-off, or the shutdown was "
                   "cancelled)")
            if dropped:
                why += f"; {dropped} measurement records that never reached the TPM were cut"
            error = RelaunchAborted(why)
            engine.transition(last_error=error_json(error))
            log.error("%s", why, extra={"MESSAGE_ID": MESSAGE_IDS["failure"],
                                        "RELAUNCH_ID": pending.id})
            engine.record_history("relaunch-aborted", pending.id, {
                "why": why, "log_records_dropped": dropped,
                "restored": rolled.restored if rolled is not None else []})
            return
        try:
            result = conclude(engine.config, engine.machine, pending)
        except Exception as exc:      # never keep the service down over the proof
            log.exception("proving relaunch %s failed", pending.id)
            result = {"id": pending.id, "image": pending.path, "method": pending.method,
                      "time": pending.time, "verified": False, "measured": False,
                      "drtm": False, "downtime_ms": None,
                      "mismatches": [f"the proof could not run: {exc}"],
                      "firmware_time": unknown_firmware_time(
                          f"the proof could not run: {exc}")}
        engine.store.save_last_relaunch(result)
        engine.store.clear_pending()
        engine.transition(last_relaunch=result)
        verified = bool(result.get("verified"))
        event = "relaunch-verified" if verified else "relaunch-unverified"
        engine.record_history(event, pending.id,
                      {"mismatches": result.get("mismatches", []),
                       "downtime_ms": result.get("downtime_ms"),
                       "measured": result.get("measured"),
                       "firmware_avoided_usec": firmware_avoided_usec(result)})
        fields = {"MESSAGE_ID": MESSAGE_IDS["verified" if verified else "unverified"],
                  "RELAUNCH_ID": pending.id}
        if verified:
            log.info("relaunch %s verified: running the staged image (%s, %s, %s ms)",
                     pending.id, pending.method,
                     "measured" if result.get("measured") else "not measured",
                     result.get("downtime_ms"), extra=fields)
        else:
            log.error("relaunch %s NOT VERIFIED: %s", pending.id,
                      "; ".join(result.get("mismatches", [])), extra=fields)


def conclude(config: Config, machine: Machine, pending: PendingRecord) -> dict[str, Any]:
    """The LastRelaunch record of the boot we are in, which `pending` led to."""
    cfg = config.measurement
    measurement = pending.measurement
    verdict = reset_count = error = None
    if measurement.get("measured"):
        pcr = int(measurement.get("pcr", cfg.pcr))
        banks = tuple(measurement.get("banks") or cfg.banks)
        try:
            reset_count = machine.tpm_reset_count(cfg.tcti)
            verdict = machine.replay_log(measurement.get("log") or log_path(config),
                                         cfg.tcti, pcr, banks)
        except RelaunchError as exc:
            error = str(exc)
    facts = machine.boot_facts(registry.is_drtm(pending.method), cfg.tcti)
    # Read in this boot: the cold boot a kexec descends from, or the firmware reboot's.
    firmware = machine.firmware_time()
    return evaluate(pending, facts, verdict=verdict, reset_count=reset_count,
                    measurement_error=error, firmware_time=firmware)


def recover_measurement(config: Config, machine: Machine, pending: PendingRecord) -> int:
    """After a relaunch that stopped before the hand-off: cut the log back to the PCR
    (a daemon killed between writing the log and extending). Records dropped."""
    cfg = config.measurement
    try:
        return machine.recover_log(log_path(config), cfg.tcti, cfg.pcr, cfg.banks)
    except NoTpm:
        return 0
    except RelaunchError as exc:
        log.error("cannot check the measurement log after relaunch %s: %s", pending.id, exc)
        return 0


def evaluate(pending: PendingRecord, facts: BootFacts, *, verdict: ReplayResult | None,
             reset_count: int | None, measurement_error: str | None = None,
             firmware_time: dict[str, Any] | None = None) -> dict[str, Any]:
    """The LastRelaunch record for the boot described by `facts`; `firmware_time` is
    Machine.firmware_time() read in this boot (None: not read)."""
    mismatches: list[str] = []
    # Why this boot went through firmware (then it avoided nothing), if it did.
    through_firmware: str | None = None
    if facts.boot_id is None:
        mismatches.append("the boot id is unreadable")
    elif facts.boot_id == pending.boot_id:
        mismatches.append("the boot id did not change: no new boot")

    running = (facts.cmdline or "").strip()
    fallback = pending.handoff == FALLBACK_HANDOFF
    cmdline_ok = facts.cmdline is not None and running == pending.cmdline.strip()
    if fallback:
        # Not a relaunch at all: the firmware booted whatever the boot loader chose.
        # Never verified, whatever else this boot looks like.
        cmdline_ok = False
        mismatches.append("no relaunch: relaunchd fell back to a firmware reboot ("
                          f"{pending.fallback_reason or 'reason not recorded'})")
        through_firmware = "firmware reboot: the fallback"
    elif not cmdline_ok:
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
            through_firmware = through_firmware or (
                f"firmware reboot: the TPM reset count went from {before} to {reset_count}")
        elif verdict is not None and not verdict.ok:
            mismatches.extend(verdict.mismatches)

    drtm_method = registry.is_drtm(pending.method)
    drtm = False
    if drtm_method:
        pcrs = facts.drtm_pcrs
        if not facts.slaunch:
            mismatches.append("no Secure Launch in this boot (/sys/kernel/security/slaunch "
                              "is missing)")
            failure = launch_failure(facts.txt_errorcode)
            if failure:
                mismatches.append(failure)
                through_firmware = through_firmware or (
                    "firmware reboot: the dynamic launch reset the machine (TXT.ERRORCODE "
                    f"{facts.txt_errorcode:#010x})")
            elif through_firmware and pending.method == "txt":
                # The DL handler resets on a failed check under launch.require_drtm, but
                # its reason reaches TXT.ERRORCODE only while the private space is open,
                # which it is not before a launch (docs/drtm.md "When a check fails").
                mismatches.append("the TXT launch ended in a platform reset with no reason "
                                  "recorded (the DL handler's checks under "
                                  "launch.require_drtm, or SINIT); run `relaunchctl check "
                                  "--method txt` on this boot")
        if "error" in pcrs:
            mismatches.append(f"PCRs 17/18 unreadable: {pcrs['error']}")
        elif pcrs.get("reset_state", True):
            mismatches.append("PCRs 17/18 are in their reset state: no dynamic launch")
        log_problems, drtm_log = check_drtm_log(pending.predictions.get("drtm"), facts)
        mismatches.extend(log_problems)
        drtm = (facts.slaunch and not pcrs.get("reset_state", True) and "error" not in pcrs
                and not log_problems)

    handed_off = float(pending.handoff_at) if pending.handoff_at else None
    downtime_ms = phases = None
    if handed_off is not None and facts.now >= handed_off:
        downtime_ms = round((facts.now - handed_off) * 1000)
        if facts.kernel_started is not None and handed_off <= facts.kernel_started <= facts.now:
            phases = {"down_ms": round((facts.kernel_started - handed_off) * 1000),
                      "up_ms": round((facts.now - facts.kernel_started) * 1000)}

    result = {
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
        "firmware_time": avoided_firmware_time(firmware_time, through_firmware=through_firmware,
                                               staged_kernel=cmdline_ok),
    }
    if drtm_method:
        result["drtm_log"] = drtm_log
        if facts.txt_errorcode is not None:
            result["txt_errorcode"] = f"{facts.txt_errorcode:#010x}"
    if fallback:
        result["fallback"] = {"reason": pending.fallback_reason or ""}
    return result


def avoided_firmware_time(firmware: dict[str, Any] | None, *, through_firmware: str | None,
                          staged_kernel: bool) -> dict[str, Any]:
    """LastRelaunch.firmware_time: the firmware time read in this boot, with `avoided_usec`
    what this relaunch avoided — the last cold boot's firmware + boot loader time after a
    kexec or DRTM relaunch, 0 when this boot came `through_firmware` (why, in `reason`),
    None when that is unknown (`reason` says why)."""
    if firmware is None:
        return unknown_firmware_time("the firmware time was not read")
    result = dict(firmware)
    if through_firmware is not None:
        # The figures now describe this boot's own firmware run, which was not avoided.
        result.update(avoided_usec=0, reason=through_firmware)
    elif not staged_kernel:
        result.update(avoided_usec=None, reason=(
            "this boot is not the staged kernel (/proc/cmdline differs): whether it went "
            "through firmware is unknown"))
    return result


def unknown_firmware_time(reason: str) -> dict[str, Any]:
    return FirmwareTime(UNKNOWN, reason=reason).to_json()


def firmware_avoided_usec(last_relaunch: dict[str, Any]) -> int | None:
    """The history's `firmware_avoided_usec` of a LastRelaunch record (None: unknown)."""
    firmware = last_relaunch.get("firmware_time")
    value = firmware.get("avoided_usec") if isinstance(firmware, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def launch_failure(errorcode: int | None) -> str | None:
    """Why a TXT launch did not happen, when TXT.ERRORCODE says: a reset by SINIT, by
    Secure Launch or by relaunchd's DL handler before GETSEC[SENTER] (its reason codes,
    formats.txt_dl_handler). None when the register is unread or holds no error."""
    if errorcode is None:
        return None
    decoded = txt_registers.decode_errorcode(errorcode)
    if decoded.success or not decoded.valid:
        return None
    return f"the dynamic launch failed: TXT.ERRORCODE {errorcode:#010x}, {decoded.text}"


def check_drtm_log(prediction: dict[str, Any] | None, facts: BootFacts
                   ) -> tuple[list[str], dict[str, Any]]:
    """Mismatches of the DRTM event log against the TPM and against the prediction, and
    a summary for LastRelaunch."""
    summary: dict[str, Any] = {"events": 0, "replays": False, "predicted": 0, "matched": 0}
    if facts.drtm_log is None:
        return [f"the DRTM event log is unreadable: {facts.drtm_log_error or 'absent'}"], \
            summary
    try:
        records = eventlog.parse_log(facts.drtm_log, zero_tail=True).records
    except InvalidEventLog as exc:
        return [f"the DRTM event log is malformed: {exc}"], summary
    summary["events"] = len(records)
    problems: list[str] = []
    pcrs = facts.drtm_pcrs
    bank, values = pcrs.get("bank"), pcrs.get("values") or {}
    if bank and values:
        for pcr in DRTM_LAUNCH_PCRS:
            tpm_value = values.get(pcr)
            try:
                logged = eventlog.replay(records, bank, pcr).hex()
            except (InvalidEventLog, ValueError) as exc:
                problems.append(f"the DRTM event log cannot be replayed for PCR {pcr}: {exc}")
                continue
            if tpm_value is not None and logged != tpm_value:
                problems.append(f"the DRTM event log does not replay to PCR {pcr} {bank}: the "
                                f"log gives {logged}, the TPM has {tpm_value}")
        summary["replays"] = not problems
    if not prediction:
        problems.append("no DRTM prediction was recorded at staging (not staged with the "
                        "segment loader?)")
        return problems, summary
    expected = prediction.get("events") or []
    summary["predicted"] = len(expected)
    logged_events = [r for r in records if r.event_type == SL_EVTYPE_SECURE_LAUNCH]
    cursor = 0
    for event in expected:
        pcr, label = int(event["pcr"]), str(event["label"])
        found = None
        while cursor < len(logged_events):
            candidate = logged_events[cursor]
            cursor += 1
            if candidate.pcr == pcr and candidate.data.rstrip(b"\0").decode(
                    "utf-8", "replace") == label:
                found = candidate
                break
        if found is None:
            problems.append(f"DRTM event {label!r} (PCR {pcr}) is not in the log where the "
                            "SLRT policy puts it")
            cursor = 0      # keep looking for the others from the start
            continue
        before = len(problems)
        for digest_bank, want in (event.get("digests") or {}).items():
            got = found.digest(digest_bank)
            if got is None:
                problems.append(f"DRTM event {label!r} has no {digest_bank} digest in the log")
            elif got.hex() != want:
                problems.append(f"DRTM event {label!r} (PCR {pcr}) {digest_bank} is {got.hex()}, "
                                f"predicted {want}")
        summary["matched"] += len(problems) == before
    return problems, summary
