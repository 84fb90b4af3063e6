"""The steps of a relaunch that are not state-machine bookkeeping (engine layer).

`engine.Engine` owns the states, the locks and the records' life cycle; this module
holds what each step decides, with the platform doing the work:

- `readiness`: may this relaunch go now? (method still ready, logind inhibitors);
- `measure`: extend the staged digests into the configured PCR, or say why not;
- `conclude`: after the new boot, the LastRelaunch record (proof.evaluate) and the
  measurement facts it needs;
- `metrics`: the Prometheus textfile view of the engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from relaunchd.engine import proof
from relaunchd.engine.config import Config
from relaunchd.engine.state import PendingRecord, StagedRecord, StateStore
from relaunchd.errors import Inhibited, NoTpm, NotReady, RelaunchError
from relaunchd.launch import registry
from relaunchd.platform import quiesce
from relaunchd.platform.tpm_extend_log import LOG_NAME

log = logging.getLogger("relaunchd.engine")

MEASURED_ITEMS = ("kernel", "initrd", "cmdline")    # in this order, into one PCR


def readiness(config: Config, platform: Any, record: StagedRecord,
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
    if config.quiesce.respect_inhibitors:
        blockers = platform.block_inhibitors()
        if blockers:
            named = "; ".join(f"{b['who']} ({b['why']}, pid {b['pid']})" for b in blockers)
            if not force:
                raise Inhibited(f"shutdown is blocked by logind inhibitors: {named}; wait "
                                "for them, or force")
            overridden.append(f"inhibitors: {named}")
    return overridden


def log_path(config: Config) -> str:
    return os.path.join(config.state_dir, LOG_NAME)


def measure(config: Config, platform: Any, record: StagedRecord) -> dict[str, Any]:
    """Extend kernel, initrd and cmdline into the PCR; the `measurement` of the pending
    record. Without a TPM: unmeasured when allowed (require_tpm off), else NoTpm. A TPM
    that refuses (TpmFailed) always stops the relaunch."""
    cfg = config.measurement
    base: dict[str, Any] = {"pcr": cfg.pcr, "banks": list(cfg.banks), "log": log_path(config)}
    items = []
    for label in MEASURED_ITEMS:
        digests = record.digests.get(label)
        if digests is None:
            continue                      # no initrd
        missing = [b for b in cfg.banks if b not in digests]
        if missing:
            # Staged under another configuration: the digests of a bank are not known.
            raise NotReady(f"the staged {label} has no {', '.join(missing)} digest "
                           "(measurement.banks changed since staging); stage again")
        items.append((label, {b: bytes.fromhex(digests[b]) for b in cfg.banks}))
    if not items:
        raise NotReady("the staged record carries no digests to measure; stage again")
    try:
        count = platform.measure(cfg.tcti, cfg.pcr, cfg.banks, items, log_path(config),
                                 record.id)
    except NoTpm as exc:
        if cfg.require_tpm:
            raise NoTpm(f"{exc}; measurement.require_tpm is set") from exc
        log.warning("relaunch %s is not measured: %s", record.id, exc)
        return {**base, "measured": False, "reason": str(exc)}
    return {**base, "measured": True, "reset_count": count,
            "items": [label for label, _ in items]}


def conclude(config: Config, platform: Any, pending: PendingRecord) -> dict[str, Any]:
    """The LastRelaunch record of the boot we are in, which `pending` led to."""
    cfg = config.measurement
    measurement = pending.measurement
    verdict = reset_count = error = None
    if measurement.get("measured"):
        pcr = int(measurement.get("pcr", cfg.pcr))
        banks = tuple(measurement.get("banks") or cfg.banks)
        try:
            reset_count = platform.tpm_reset_count(cfg.tcti)
            verdict = platform.measurement_verdict(measurement.get("log") or log_path(config),
                                                   cfg.tcti, pcr, banks)
        except RelaunchError as exc:
            error = str(exc)
    facts = platform.boot_facts(registry.is_drtm(pending.method), cfg.tcti)
    return proof.evaluate(pending, facts, verdict=verdict, reset_count=reset_count,
                            measurement_error=error)


def recover_measurement(config: Config, platform: Any, pending: PendingRecord) -> int:
    """After a relaunch that stopped before the hand-off: cut the log back to the PCR
    (a daemon killed between writing the log and extending). Records dropped."""
    cfg = config.measurement
    try:
        return platform.recover_log(log_path(config), cfg.tcti, cfg.pcr, cfg.banks)
    except NoTpm:
        return 0
    except RelaunchError as exc:
        log.error("cannot check the measurement log after relaunch %s: %s", pending.id, exc)
        return 0


def plan_summary(plan: quiesce.QuiescePlan) -> dict[str, Any]:
    return {"offline_cpus": list(plan.offline_cpus),
            "devices": [{"address": d.address, "driver": d.driver} for d in plan.devices],
            "holders": [{"pid": h.pid, "comm": h.comm, "path": h.path} for h in plan.holders],
            "kept_cpus": [{"cpu": k.cpu, "reason": k.reason} for k in plan.kept_cpus],
            "notes": list(plan.notes)}


def write_metrics(config: Config, store: StateStore, *, state: str, staged: bool,
                  last_relaunch: dict[str, Any]) -> None:
    path = config.metrics.textfile_path
    if not path:
        return
    from relaunchd import prometheus

    totals = {"verified": 0, "unverified": 0}
    for entry in store.history():
        if entry.event == "relaunch-verified":
            totals["verified"] += 1
        elif entry.event == "relaunch-unverified":
            totals["unverified"] += 1
    try:
        prometheus.write_textfile(path, prometheus.Metrics(
            staged=staged, last_relaunch=last_relaunch, relaunches_total=totals, state=state))
    except OSError as exc:
        log.warning("cannot write the metrics textfile %s: %s", path, exc)
