"""The relaunch (engine layer): readiness, measurement, the hand-off, and the rehearsal.

`Relauncher.relaunch` refuses unless an image is staged, loaded and its method still ready;
writes the pending record first (a daemon killed from then on is found out at its next
start); extends the staged digests into the configured PCR with a log; and hands off to
systemd (its shutdown hook quiesces) or, `immediate`, quiesces here and jumps. A hand-off
that fails leaves everything as it was: staged, no pending record, LastError set.
`rehearse` quiesces the live system as the relaunch would, checks, and rolls back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from relaunchd.engine import state
from relaunchd.engine.config import Config
from relaunchd.engine.journal_ids import MESSAGE_IDS
from relaunchd.engine.last_error import as_error, error_json, kexec_loaded_text
from relaunchd.engine.machine import Machine
from relaunchd.engine.progress import progress_of
from relaunchd.engine.state import StagedRecord
from relaunchd.errors import (
    Inhibited,
    InvalidArgument,
    KexecFailed,
    NoTpm,
    NotReady,
    NotStaged,
    QuiesceFailed,
    RelaunchError,
)
from relaunchd.platform import quiesce
from relaunchd.platform.tpm_extend_log import LOG_NAME

if TYPE_CHECKING:
    from relaunchd.engine.core import Engine

log = logging.getLogger("relaunchd.engine")

FALLBACKS = ("none", "reboot")
FALLBACK_METHOD = "firmware-reboot"     # the method a fallback reboot reports
FALLBACK_HANDOFF = "reboot"             # Machine.handoff kind: reboot.target


class Relauncher:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def relaunch(self, *, force: bool = False, immediate: bool = False,
                 fallback: str | None = None) -> str:
        """Measure, then hand the staged image to systemd (its shutdown hook quiesces),
        or with `immediate` quiesce here and jump. Returns the relaunch id. On failure
        everything is as before: staged, no pending record, LastError set, the error
        raised; a measurement already extended stays in the log (it replays).

        `fallback` ("none" | "reboot"; None: `launch.fallback`): with "reboot", a relaunch
        that cannot happen — nothing staged, the method not ready, a TPM that refuses, a
        hand-off systemd refused — becomes an ordinary firmware reboot instead, recorded
        in the history and reported by the next boot as a fallback (never verified).
        Held logind block inhibitors and a busy engine are never overridden this way."""
        engine = self.engine
        fallback = fallback if fallback is not None else engine.config.launch.fallback
        if fallback not in FALLBACKS:
            raise InvalidArgument(f"unknown fallback {fallback!r} (one of "
                                  f"{', '.join(FALLBACKS)})")
        if fallback == "reboot" and immediate:
            raise InvalidArgument("--fallback reboot goes through systemd; it cannot be "
                                  "combined with immediate")
        engine.begin_operation()
        try:
            try:
                record = self._relaunchable()
                engine.refresh_capabilities()
                overridden = readiness(engine.config, engine.machine, record,
                                       engine.capabilities, force=force)
            except (NotStaged, NotReady) as exc:
                if fallback != "reboot":
                    raise
                return self._fallback_reboot(exc, force=force)
            kind = "immediate" if immediate else "systemd"
            plan = self._quiesce_plan(record) if immediate else None
            pending = state.PendingRecord(
                id=record.id, time=state.now(), path=record.path, method=record.method,
                loader=record.loader, kernel_sha256=record.kernel_sha256,
                initrd_sha256=record.initrd_sha256, cmdline=record.cmdline, handoff=kind,
                boot_id=engine.machine.boot_id(), force=force, predictions=record.predictions or {},
                handoff_at=time.time())
            # Written first: a daemon killed from here on is found out at its next start.
            engine.store.save_pending(pending)
            engine.transition(state="relaunching", last_error={},
                              progress=progress_of("measuring", 0, 3, 0))
            quiesced = False
            try:
                measurement = measure(engine.config, engine.machine, record)
                pending = dataclasses.replace(pending, measurement=measurement,
                                              handoff_at=time.time())
                engine.store.save_pending(pending)
                engine.record_history("relaunch-started", record.id, {
                    "handoff": kind, "force": force, "method": record.method,
                    "measured": measurement["measured"], "overridden": overridden})
                log.warning("relaunch %s: handing off (%s, %s)", record.id, kind,
                            "measured" if measurement["measured"] else "NOT measured",
                            extra={"MESSAGE_ID": MESSAGE_IDS["relaunch"],
                                   "RELAUNCH_ID": record.id})
                if plan is not None:
                    engine.transition(state="quiescing",
                                         progress=progress_of("quiescing", 1, 3, 40))
                    quiesced = True
                    engine.machine.quiesce(plan, self._journal_path())
                    engine.transition(state="relaunching",
                                         progress=progress_of("handing off", 2, 3, 80))
                else:
                    engine.store.save_runtime(state.HANDOFF, {"id": record.id})
                    engine.transition(progress=progress_of("handing off", 2, 3, 80))
                pending = dataclasses.replace(pending, handoff_at=time.time())
                engine.store.save_pending(pending)
                engine.machine.handoff(kind)
            except BaseException as exc:
                self._handoff_failed(record, kind, exc, quiesced)
                if fallback == "reboot" and (isinstance(exc, NotReady | KexecFailed)
                                             or type(exc) is RelaunchError):
                    # The TPM refused, the load vanished, or systemd refused kexec.target:
                    # the relaunch cannot happen; an orchestrator still gets its reboot.
                    return self._fallback_reboot(exc, force=force)
                if isinstance(exc, RelaunchError):
                    raise
                raise as_error(exc) from exc
            log.info("relaunch %s handed off (%s)", record.id, kind)
            engine.transition(progress=progress_of("handed off", 3, 3, 100))
            return record.id
        finally:
            engine.release_operation()

    def _fallback_reboot(self, cause: RelaunchError, *, force: bool) -> str:
        """The relaunch cannot happen: record why, and reboot through firmware (held: op
        lock). The kexec image is unloaded first, so nothing turns the reboot into a kexec
        (Debian's kexec-tools would, for a loaded image)."""
        engine = self.engine
        with engine.lock:
            record = engine.record
        relaunch_id = record.id if record is not None else str(uuid.uuid4())
        reason = f"{cause.name}: {cause}"
        pending = state.PendingRecord(
            id=relaunch_id, time=state.now(), path=record.path if record else "",
            method=FALLBACK_METHOD, loader="", kernel_sha256="", initrd_sha256=None,
            cmdline="", handoff=FALLBACK_HANDOFF, boot_id=engine.machine.boot_id(),
            force=force, handoff_at=time.time(), fallback_reason=reason)
        engine.store.save_pending(pending)
        engine.record_history("relaunch-fallback", relaunch_id,
                              {"reason": reason, "error": cause.name})
        log.warning("relaunch %s cannot happen (%s): falling back to a firmware reboot",
                    relaunch_id, reason, extra={"MESSAGE_ID": MESSAGE_IDS["relaunch"],
                                                "RELAUNCH_ID": relaunch_id})
        engine.transition(state="relaunching", last_error=error_json(cause),
                          progress=progress_of("rebooting", 0, 1, 0))
        try:
            if engine.machine.kexec_loaded():
                engine.machine.unload()
            engine.machine.handoff(FALLBACK_HANDOFF)
        except BaseException as exc:
            error = as_error(exc)
            message = f"the fallback reboot failed: {error} (after {reason})"
            try:
                engine.store.clear_pending()
            except OSError as os_exc:
                message += f"; cannot clean up: {os_exc}"
            engine.reconcile_locked()       # what is (still) loaded decides the state
            engine.transition(last_error=error_json(error, message))
            engine.record_history("relaunch-failed", relaunch_id,
                                  {"error": error.name, "message": message,
                                   "handoff": FALLBACK_HANDOFF})
            raise RelaunchError(message) from exc
        engine.transition(progress=progress_of("rebooting", 1, 1, 100))
        return relaunch_id

    def rehearse(self) -> dict:
        """Quiesce the live system as the staged relaunch would, check, roll back, check
        again. The report; QuiesceFailed (rolled back) when a step fails."""
        engine = self.engine
        engine.begin_operation()
        try:
            record = self._relaunchable()
            plan = self._quiesce_plan(record)
            engine.transition(state="quiescing", last_error={},
                                 progress=progress_of("rehearsing", 0, 1, 0))
            try:
                report = engine.machine.rehearse(plan, self._journal_path())
            except BaseException as exc:
                error = as_error(exc)
                engine.transition(state="staged", progress=progress_of("staged", 1, 1, 100),
                                     last_error=error_json(error))
                engine.record_history("rehearsal-failed", record.id,
                              {"error": error.name, "message": str(error)})
                raise error from exc
            result = rehearsal_json(report)
            engine.transition(state="staged", progress=progress_of("staged", 1, 1, 100))
            engine.record_history("rehearsed", record.id, {
                "ok": result["ok"], "executed": len(result["executed"]),
                "mismatches": result["mismatches"]})
            log.info("relaunch %s rehearsed: %s", record.id,
                     "ok" if result["ok"] else "; ".join(result["mismatches"]) or "failed")
            return result
        finally:
            engine.release_operation()

    def _relaunchable(self) -> state.StagedRecord:
        """The staged record, if it is staged and loaded (held: op lock)."""
        engine = self.engine
        with engine.lock:
            current, record = engine.state, engine.record
        if current != "staged" or record is None:
            raise NotStaged(f"nothing is staged (state {current})")
        loaded = engine.machine.kexec_loaded()
        if loaded is not True:
            engine.reconcile_locked()     # the record was stale: say so in State too
            raise NotReady("the kernel reports no kexec image loaded "
                           f"(/sys/kernel/kexec_loaded: {kexec_loaded_text(loaded)}); stage again")
        return record

    def _quiesce_plan(self, record: state.StagedRecord) -> quiesce.QuiescePlan:
        saved = self.engine.store.load_runtime(state.QUIESCE_PLAN)
        if saved is None or saved.get("id") != record.id:
            raise NotReady(f"no quiesce plan for {record.id} in {self.engine.config.runtime_dir}; "
                           "stage again")
        try:
            return quiesce.QuiescePlan.from_json(json.dumps(saved.get("plan")))
        except InvalidArgument as exc:
            raise NotReady(f"the quiesce plan of {record.id} is unusable: {exc}; "
                           "stage again") from exc

    def _journal_path(self) -> str:
        return self.engine.store.runtime_path(state.QUIESCE_JOURNAL)

    def _handoff_failed(self, record: state.StagedRecord, kind: str, exc: BaseException,
                        quiesced: bool) -> None:
        """Undo a relaunch that did not get away: roll back a quiesce, forget the
        pending record and the hook's marker, back to staged with LastError."""
        engine = self.engine
        error = as_error(exc)
        notes = []
        if quiesced and not isinstance(exc, QuiesceFailed):   # QuiesceFailed rolled back
            try:
                rolled = engine.machine.rollback(self._journal_path())
                if not rolled.ok:
                    notes.append("ROLLBACK INCOMPLETE: " + "; ".join(rolled.failed))
            except Exception as rb:
                notes.append(f"ROLLBACK FAILED: {rb}")
        for clear in (engine.store.clear_pending,
                      lambda: engine.store.clear_runtime(state.HANDOFF)):
            try:
                clear()
            except OSError as os_exc:
                notes.append(f"cannot clean up: {os_exc}")
        message = str(error) + ("; " + "; ".join(notes) if notes else "")
        shown = {"name": error.name, "message": message, "time": state.now()}
        engine.transition(state="staged", progress=progress_of("staged", 1, 1, 100),
                             last_error=shown)
        log.warning("relaunch %s: %s hand-off failed: %s", record.id, kind, message)
        engine.record_history("relaunch-failed", record.id,
                      {"error": error.name, "message": message, "handoff": kind})


# In this order, into one PCR; initrd and dl-handler only when staged.
MEASURED_ITEMS = ("kernel", "initrd", "cmdline", "dl-handler")


def readiness(config: Config, machine: Machine, record: StagedRecord,
              capabilities: dict[str, Any], *, force: bool) -> list[str]:
    """Refuse (NotReady, Inhibited) what `force` does not override; return what it did."""
    overridden: list[str] = []
    verdict = capabilities.get(record.method, {})
    reasons = list(verdict.get("reasons", []))
    ready = bool(verdict.get("ready", False))
    if not ready and record.method == "kexec" and not config.measurement.require_tpm:
        # The probe's "kexec" is *measured* kexec; without require_tpm a missing TPM
        # only means an unmeasured relaunch (measure() says so), not a refusal.
        reasons = [r for r in reasons if not r.startswith("tpm-")]
        ready = not reasons
    if not ready:
        why = ", ".join(reasons) or "unknown"
        if not force:
            raise NotReady(f"the {record.method} method is no longer ready ({why}); see "
                           "`relaunchctl check`, or force")
        overridden.append(f"method {record.method} not ready: {why}")
    if config.launch.sealed_volumes == "block":
        stuck = volumes_that_stay_locked(config, machine, record.method)
        if stuck:
            if not force:
                raise NotReady(f"{stuck}; set launch.sealed_volumes: report to relaunch "
                               "anyway, or force")
            overridden.append(stuck)
    if config.quiesce.respect_inhibitors:
        blockers = machine.block_inhibitors()
        if blockers:
            named = "; ".join(f"{b['who']} ({b['why']}, pid {b['pid']})" for b in blockers)
            if not force:
                raise Inhibited(f"shutdown is blocked by logind inhibitors: {named}; wait "
                                "for them, or force")
            overridden.append(f"inhibitors: {named}")
    return overridden


def volumes_that_stay_locked(config: Config, machine: Machine, method: str) -> str | None:
    """What `launch.sealed_volumes: block` refuses: TPM-sealed volumes whose policy the
    relaunch would leave unsatisfied (the new boot would ask for a passphrase). A volume
    that cannot be read is logged, not counted: nothing says it is sealed to the TPM."""
    cfg = config.measurement
    stuck = []
    for volume in machine.sealed_volumes(method, cfg.tcti, cfg.pcr):
        if volume.get("error"):
            log.warning("sealed volume %s: %s", volume.get("name") or "?", volume["reason"])
        elif not volume.get("unlocks_after_relaunch"):
            remedy = f"; {volume['remedy']}" if volume.get("remedy") else ""
            stuck.append(f"{volume['name']} ({volume['reason']}{remedy})")
    if not stuck:
        return None
    return ("TPM-sealed volume(s) would not unlock after the relaunch: " + "; ".join(stuck))


def log_path(config: Config) -> str:
    return os.path.join(config.state_dir, LOG_NAME)


def measure(config: Config, machine: Machine, record: StagedRecord) -> dict[str, Any]:
    """Extend kernel, initrd and cmdline into the PCR; the `measurement` of the pending
    record. Without a TPM: unmeasured when allowed (require_tpm off), else NoTpm. A TPM
    that refuses (TpmFailed) always stops the relaunch."""
    cfg = config.measurement
    base: dict[str, Any] = {"pcr": cfg.pcr, "banks": list(cfg.banks), "log": log_path(config)}
    items = []
    for label in MEASURED_ITEMS:
        digests = record.digests.get(label)
        if digests is None:
            continue                      # no initrd, or no DL handler
        missing = [b for b in cfg.banks if b not in digests]
        if missing:
            # Staged under another configuration: the digests of a bank are not known.
            raise NotReady(f"the staged {label} has no {', '.join(missing)} digest "
                           "(measurement.banks changed since staging); stage again")
        items.append((label, {b: bytes.fromhex(digests[b]) for b in cfg.banks}))
    if not items:
        raise NotReady("the staged record carries no digests to measure; stage again")
    try:
        count = machine.measure(cfg.tcti, cfg.pcr, cfg.banks, items, log_path(config),
                                 record.id)
    except NoTpm as exc:
        if cfg.require_tpm:
            raise NoTpm(f"{exc}; measurement.require_tpm is set") from exc
        log.warning("relaunch %s is not measured: %s", record.id, exc)
        return {**base, "measured": False, "reason": str(exc)}
    return {**base, "measured": True, "reset_count": count,
            "items": [label for label, _ in items]}


def plan_summary(plan: quiesce.QuiescePlan) -> dict[str, Any]:
    return {"offline_cpus": list(plan.offline_cpus),
            "devices": [{"address": d.address, "driver": d.driver} for d in plan.devices],
            "holders": [{"pid": h.pid, "comm": h.comm, "path": h.path} for h in plan.holders],
            "kept_cpus": [{"cpu": k.cpu, "reason": k.reason} for k in plan.kept_cpus],
            "uninspected": plan.uninspected, "notes": list(plan.notes)}


def rehearsal_json(report: quiesce.RehearsalReport) -> dict:
    return {"ok": report.ok, "quiesced_ok": report.quiesced_ok,
            "restored_ok": report.restored_ok, "mismatches": list(report.mismatches),
            "executed": [{"action": e.action, "target": e.target, "previous": e.previous}
                         for e in report.executed],
            "rollback": {"restored": list(report.rollback.restored),
                         "already": list(report.rollback.already),
                         "failed": list(report.rollback.failed),
                         "notes": list(report.rollback.notes)}}
