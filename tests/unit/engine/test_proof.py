"""Proving a relaunch after the new boot (relaunchd.engine.proof): the engine over the
FakeMachine concluding a pending record in the boot it led to (boot id, command line, TPM
reset counter and log replay, a relaunch aborted in the same boot), and `evaluate` on DRTM
launches: the DRTM event log must replay to the TPM's PCRs 17/18 and hold the events
relaunchd's SLRT policy predicted at staging (tests/support/drtmlog.py writes the log)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from relaunchd.engine import proof, state
from relaunchd.engine.machine import BootFacts
from relaunchd.engine.state import PendingRecord
from relaunchd.formats import slrt
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.platform.tpm_extend_log import ReplayResult
from support.drtmlog import CMDLINE, PREDICTED, launch_log, prediction
from support.engine_env import (
    relaunched,
    staged_engine,
)
from support.fakes import BOOT_ID


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


# ------------------------------------------------------------------ the engine in the new boot

def test_new_boot_proves_the_relaunch(env):
    relaunched(env)
    env.machine.facts = dataclasses.replace(env.machine.facts,
                                             kernel_started=time.time())
    engine = env.engine()
    last = engine.last_relaunch
    assert last["verified"] is True, last["mismatches"]
    assert last["measured"] is True and last["drtm"] is False and last["mismatches"] == []
    assert last["previous_boot_id"] == BOOT_ID and last["boot_id"] == "new-boot"
    assert last["downtime_ms"] >= 0 and set(last["phases"]) == {"down_ms", "up_ms"}
    assert not env.pending_json.exists()
    assert engine.history()[0]["event"] == "relaunch-verified"
    assert json.loads((Path(env.config.state_dir) / "last-relaunch.json").read_text()) == last
    assert env.engine().last_relaunch == last          # kept across restarts


@pytest.mark.parametrize("what, expect", [
    ("cmdline", "/proc/cmdline is"),
    ("reset", "the TPM was reset since the hand-off"),
    ("log", "PCR 23 sha256: log replays"),
    ("boot_id", "the boot id did not change"),
])
def test_new_boot_that_is_not_the_staged_one_is_unverified(env, what, expect):
    relaunched(env)
    p = env.machine
    if what == "cmdline":
        p.facts = dataclasses.replace(p.facts, cmdline="console=ttyS0 quiet\n")
    elif what == "reset":
        p.reset_count = 8
    elif what == "log":
        p.verdict = ReplayResult(False, {"sha256": "aa"}, {"sha256": "bb"},
                            ("PCR 23 sha256: log replays to aa, TPM has bb",))
    else:
        p.facts = dataclasses.replace(p.facts, boot_id=BOOT_ID)
        # the boot id file says new-boot, so the engine treats it as a new boot, but
        # the facts it gathers disagree: the outcome must still fail
    engine = env.engine()
    last = engine.last_relaunch
    assert last["verified"] is False
    assert any(expect in m for m in last["mismatches"]), last["mismatches"]
    assert engine.history()[0]["event"] == "relaunch-unverified"


def test_unmeasured_relaunch_is_verified_without_a_tpm_check(env):
    env.machine.tpm = False
    relaunched(env)
    env.machine.verdict = ReplayResult(False, {}, {}, ("would fail",))
    last = env.engine().last_relaunch
    assert last["verified"] is True and last["measured"] is False


def test_restart_in_the_same_boot_reports_an_aborted_relaunch(env):
    engine, relaunch_id = staged_engine(env)
    engine.relaunch()
    engine.close()         # as if SIGKILLed after the hand-off request, no new boot
    env.machine.calls.clear()
    env.machine.dropped = 3
    again = env.engine()
    assert again.state == "staged"                     # still loaded: can try again
    assert again.last_error["name"] == "RelaunchAborted"
    assert "3 measurement records" in again.last_error["message"]
    assert ("recover",) in env.machine.calls
    assert not env.pending_json.exists()
    assert not (Path(env.config.runtime_dir) / state.HANDOFF).exists()
    assert again.history()[0]["event"] == "relaunch-aborted"
    assert again.last_relaunch == {}
    again.relaunch()
    assert again.state == "relaunching"


def test_a_drtm_relaunch_is_proven_against_the_drtm_log(env):
    """A txt relaunch: the pending record carries the SLRT-policy prediction, the new
    boot's facts the DRTM log and PCRs 17/18 (tests/support/drtmlog.py builds them, as for
    the `evaluate` tests above); the engine asks the platform for DRTM facts and publishes
    the verdict."""
    from support.drtmlog import launch_log, prediction

    relaunched(env, method="txt", loader="segments", predictions={"drtm": prediction()})
    log, values = launch_log()
    env.machine.facts = dataclasses.replace(
        env.machine.facts, slaunch=True, drtm_log=log,
        drtm_pcrs={"bank": "sha256", "values": values, "reset_state": False})
    last = env.engine().last_relaunch
    assert last["mismatches"] == [] and last["verified"] is True
    assert last["drtm"] is True and last["drtm_log"]["matched"] == 3


def test_a_drtm_log_with_a_changed_event_is_not_verified(env):
    from support.drtmlog import launch_log, prediction

    relaunched(env, method="txt", loader="segments", predictions={"drtm": prediction()})
    log, values = launch_log()
    tampered = bytearray(log)
    at = tampered.find(b"Measured Kernel command line") - 4 - 32   # its sha256 digest
    tampered[at] ^= 1
    env.machine.facts = dataclasses.replace(
        env.machine.facts, slaunch=True, drtm_log=bytes(tampered),
        drtm_pcrs={"bank": "sha256", "values": values, "reset_state": False})
    last = env.engine().last_relaunch
    assert last["verified"] is False and last["drtm"] is False
    assert any("does not replay to PCR 17" in m for m in last["mismatches"])
    assert any("'Measured Kernel command line' (PCR 17) sha256" in m
               for m in last["mismatches"])


@pytest.mark.parametrize(("errorcode", "named"), [
    # relaunchd's DL handler reset before GETSEC[SENTER] (abi.h RLD_REASON_NOT_BSP = 2)
    (0xC000C002, "relaunchd DL handler reset: NOT_BSP (not running on the bootstrap "
                 "processor) [dl-handler-not-bsp]"),
    # Secure Launch's own error (SL_ERROR_HEAP_INVALID_DMAR, platform.txt_registers)
    (0xC0008011, "Secure Launch error 0x011 HEAP_INVALID_DMAR"),
])
def test_a_txt_launch_that_reset_names_txt_errorcode(errorcode, named):
    """No Secure Launch in the new boot: the machine came back through firmware. The
    reason TXT.ERRORCODE holds (written before the reset) is in the mismatches."""
    boot = dataclasses.replace(facts(None, {}), slaunch=False, txt_errorcode=errorcode,
                               drtm_pcrs={"bank": "sha256", "values": {}, "reset_state": True})
    result = evaluate(pending(), boot)
    assert result["verified"] is False and result["txt_errorcode"] == f"{errorcode:#010x}"
    assert f"the dynamic launch failed: TXT.ERRORCODE {errorcode:#010x}, {named}" in \
        result["mismatches"]


@pytest.mark.parametrize("errorcode", [None, 0, 0xC0000001])
def test_no_txt_error_adds_no_reason(errorcode):
    assert proof.launch_failure(errorcode) is None


# ------------------------------------------------------------------ the firmware time avoided

SYSTEMD_BOOT = FirmwareTime("systemd-boot", firmware_usec=9_120_000, loader_usec=3_225_000)


def concluded(env) -> tuple[dict, dict]:
    """LastRelaunch and the history entry that concluded it, as a restarted engine reads
    them from disk."""
    env.engine()
    engine = env.engine()
    entry = engine.history()[0]
    assert entry["event"] in ("relaunch-verified", "relaunch-unverified")
    return engine.last_relaunch, entry


def test_a_kexec_relaunch_avoided_the_last_cold_boots_firmware_and_loader(env):
    relaunched(env)
    env.machine.cold_boot = SYSTEMD_BOOT      # read in the new boot: the original cold boot
    last, entry = concluded(env)
    assert last["verified"] is True
    assert last["firmware_time"] == {"source": "systemd-boot", "firmware_usec": 9_120_000,
                                     "loader_usec": 3_225_000, "avoided_usec": 12_345_000,
                                     "reason": None}
    assert entry["detail"]["firmware_avoided_usec"] == 12_345_000
    saved = json.loads((Path(env.config.state_dir) / "last-relaunch.json").read_text())
    assert saved["firmware_time"]["avoided_usec"] == 12_345_000


def test_an_unknown_firmware_time_is_null_with_the_reason(env):
    relaunched(env)                           # the FakeMachine's default: a BIOS boot
    last, entry = concluded(env)
    assert last["verified"] is True
    assert last["firmware_time"]["source"] == "unknown"
    assert last["firmware_time"]["avoided_usec"] is None
    assert "no boot loader timestamps" in last["firmware_time"]["reason"]
    assert entry["detail"]["firmware_avoided_usec"] is None


def test_a_firmware_time_that_cannot_be_read_does_not_stop_the_proof(env):
    relaunched(env)
    env.machine.fail_firmware_time = OSError("efivarfs: Input/output error")
    last, entry = concluded(env)
    assert last["verified"] is True and last["firmware_time"]["avoided_usec"] is None
    assert "Input/output error" in last["firmware_time"]["reason"]
    assert entry["detail"]["firmware_avoided_usec"] is None


def test_the_fallback_reboot_avoided_nothing(env):
    """The fallback went through firmware: the variables now describe this boot's own
    firmware run, and the relaunch avoided 0."""
    relaunched(env, handoff="reboot", method="firmware-reboot",
               fallback_reason="NotReady: kexec is not ready", measurement={"measured": False})
    env.machine.facts = dataclasses.replace(env.machine.facts, cmdline="root=/dev/vda quiet")
    env.machine.cold_boot = SYSTEMD_BOOT
    last, entry = concluded(env)
    assert last["method"] == "firmware-reboot" and last["verified"] is False
    assert last["firmware_time"]["avoided_usec"] == 0
    assert last["firmware_time"]["reason"] == "firmware reboot: the fallback"
    assert last["firmware_time"]["firmware_usec"] == 9_120_000   # this boot's firmware run
    assert entry["event"] == "relaunch-unverified"
    assert entry["detail"]["firmware_avoided_usec"] == 0


def test_a_tpm_reset_means_the_machine_went_through_firmware(env):
    relaunched(env)
    env.machine.cold_boot = SYSTEMD_BOOT
    env.machine.reset_count = 8               # 7 at the hand-off
    last, entry = concluded(env)
    assert last["verified"] is False
    assert last["firmware_time"]["avoided_usec"] == 0
    assert last["firmware_time"]["reason"] == ("firmware reboot: the TPM reset count went "
                                               "from 7 to 8")
    assert entry["detail"]["firmware_avoided_usec"] == 0


def test_a_boot_that_is_not_the_staged_kernel_avoided_an_unknown_time(env):
    relaunched(env)
    env.machine.cold_boot = SYSTEMD_BOOT
    env.machine.facts = dataclasses.replace(env.machine.facts, cmdline="root=/dev/vda")
    last, entry = concluded(env)
    assert last["verified"] is False and last["firmware_time"]["avoided_usec"] is None
    assert "not the staged kernel" in last["firmware_time"]["reason"]
    assert entry["detail"]["firmware_avoided_usec"] is None


def test_a_dynamic_launch_that_reset_the_machine_avoided_nothing():
    boot = dataclasses.replace(facts(None, {}), slaunch=False, txt_errorcode=0xC000C002,
                               drtm_pcrs={"bank": "sha256", "values": {}, "reset_state": True})
    result = proof.evaluate(pending(), boot, verdict=None, reset_count=None,
                            firmware_time=SYSTEMD_BOOT.to_json())
    assert result["firmware_time"]["avoided_usec"] == 0
    assert result["firmware_time"]["reason"] == ("firmware reboot: the dynamic launch reset "
                                                 "the machine (TXT.ERRORCODE 0xc000c002)")


def test_a_drtm_launch_as_predicted_avoided_the_cold_boot():
    log, values = launch_log()
    result = proof.evaluate(pending(), facts(log, values), verdict=None, reset_count=None,
                            firmware_time=SYSTEMD_BOOT.to_json())
    assert result["verified"] is True
    assert result["firmware_time"]["avoided_usec"] == 12_345_000


def test_without_a_firmware_time_read_it_is_unknown():
    log, values = launch_log()
    result = evaluate(pending(), facts(log, values))
    assert result["firmware_time"]["avoided_usec"] is None
    assert result["firmware_time"]["reason"] == "the firmware time was not read"
    assert proof.firmware_avoided_usec(result) is None
    assert proof.firmware_avoided_usec({}) is None
    assert proof.firmware_avoided_usec({"firmware_time": {"avoided_usec": True}}) is None
    assert proof.firmware_avoided_usec({"firmware_time": "garbage"}) is None
    assert proof.firmware_avoided_usec({"firmware_time": {"avoided_usec": 0}}) == 0


def test_a_proof_that_could_not_run_has_an_unknown_firmware_time(env, monkeypatch):
    relaunched(env)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(proof, "evaluate", broken)
    last, entry = concluded(env)
    assert last["verified"] is False
    assert last["firmware_time"]["avoided_usec"] is None
    assert last["firmware_time"]["reason"] == "the proof could not run: boom"
    assert entry["detail"]["firmware_avoided_usec"] is None


def test_a_txt_launch_that_reset_without_a_recorded_reason_says_so():
    """With the private space closed the handler's reset reason never reaches
    TXT.ERRORCODE: the proof sees a firmware boot (the TPM reset count moved) and no
    Secure Launch, and says what that means instead of guessing a reason."""
    record = dataclasses.replace(pending(), measurement={"measured": True, "reset_count": 4})
    boot = dataclasses.replace(facts(None, {}), slaunch=False, txt_errorcode=0,
                               drtm_pcrs={"bank": "sha256", "values": {}, "reset_state": True})
    result = proof.evaluate(record, boot, verdict=None, reset_count=5)
    assert result["verified"] is False
    assert any(m.startswith("the TXT launch ended in a platform reset with no reason "
                            "recorded") for m in result["mismatches"]), result["mismatches"]
    # Not said when the new boot did not come through firmware (the handler returned).
    result = proof.evaluate(record, boot, verdict=None, reset_count=4)
    assert not any("platform reset" in m for m in result["mismatches"])
