"""Proving a DRTM relaunch after the new boot: the DRTM event log must replay to the TPM's
PCRs 17/18 and hold the events relaunchd's SLRT policy predicted at staging
(tests/support/drtmlog.py writes the log)."""

from __future__ import annotations

import time

from relaunchd.engine import proof
from relaunchd.engine.machine import BootFacts
from relaunchd.engine.state import PendingRecord
from relaunchd.formats import slrt
from support.drtmlog import CMDLINE, PREDICTED, launch_log, prediction


def pending(predictions: dict | None = None) -> PendingRecord:
    return PendingRecord(
        id="r-1", time="2026-12-02T00:00:00Z", path="/boot/efi/EFI/Linux/next.efi",
        method="txt", loader="segments", kernel_sha256="00" * 32, initrd_sha256="11" * 32,
        cmdline=CMDLINE, handoff="systemd", boot_id="old-boot",
        predictions={"drtm": prediction()} if predictions is None else predictions,
        handoff_at=time.time() - 5)


def facts(log: bytes | None, values: dict, *, error: str | None = None) -> BootFacts:
    return BootFacts(boot_id="new-boot", cmdline=CMDLINE + "\n", kernel_started=None,
                     now=time.time(), slaunch=True,
                     drtm_pcrs={"bank": "sha256", "values": values, "reset_state": False},
                     drtm_log=log, drtm_log_error=error)


def evaluate(record: PendingRecord, boot: BootFacts) -> dict:
    return proof.evaluate(record, boot, verdict=None, reset_count=None)


def test_a_launch_as_predicted_is_verified():
    log, values = launch_log()
    result = evaluate(pending(), facts(log, values))
    assert result["mismatches"] == [] and result["verified"] is True
    assert result["drtm"] is True
    assert result["drtm_log"] == {"events": 6, "replays": True, "predicted": 3, "matched": 3}


def test_a_different_command_line_is_named():
    tampered = [(p, label, b"init=/bin/sh\0" if label == slrt.LABEL_CMDLINE else data)
                for p, label, data in PREDICTED]
    log, values = launch_log(tampered)
    result = evaluate(pending(), facts(log, values))
    assert result["verified"] is False and result["drtm"] is False
    [problem] = result["mismatches"]
    assert "Measured Kernel command line" in problem and "predicted" in problem


def test_a_log_that_does_not_replay_to_the_tpm_is_refused():
    log, values = launch_log()
    values[18] = "ab" * 32        # the TPM saw something the log does not show
    result = evaluate(pending(), facts(log, values))
    assert result["verified"] is False
    assert any("does not replay to PCR 18 sha256" in m for m in result["mismatches"])
    assert not any("PCR 17" in m for m in result["mismatches"])


def test_a_missing_policy_event_is_named():
    log, values = launch_log([e for e in PREDICTED if e[1] != slrt.LABEL_INITRD])
    result = evaluate(pending(), facts(log, values))
    [problem] = result["mismatches"]
    assert "Measured Kernel initrd" in problem and "not in the log" in problem


def test_no_log_no_prediction_and_garbage_each_fail_by_name():
    log, values = launch_log()
    unreadable = evaluate(pending(), facts(None, values, error="/sys/...: not-present"))
    assert any("DRTM event log is unreadable" in m for m in unreadable["mismatches"])
    unpredicted = evaluate(pending({}), facts(log, values))
    assert any("no DRTM prediction" in m for m in unpredicted["mismatches"])
    garbage = bytearray(log)
    garbage[-1] = 1               # a stray byte after the zero tail
    malformed = evaluate(pending(), facts(bytes(garbage), values))
    assert any("DRTM event log is malformed" in m for m in malformed["mismatches"])
    for result in (unreadable, unpredicted, malformed):
        assert result["verified"] is False and result["drtm"] is False
