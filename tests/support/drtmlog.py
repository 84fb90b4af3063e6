"""A DRTM event log as a TXT launch of a Secure Launch kernel leaves it, for the tests that
prove a DRTM relaunch (tests/unit/engine/test_proof.py).

Written from the TCG format (PFP §10.2: Spec ID header, TCG_PCR_EVENT2 records):
SINIT's events first (HASH_START, MLE_HASH), then the Secure Launch kernel's 0x502
policy events, in a fixed-size buffer whose end is zeros, as the kernel exports it. The
PCR values a TPM would hold are computed with hashlib, not with relaunchd's replay."""

from __future__ import annotations

import hashlib

from relaunchd.formats import eventlog, slrt

CMDLINE = "console=ttyS0 root=/dev/vda rw relaunchd.id=r-1"
BANKS = ("sha1", "sha256")
HASH_START, MLE_HASH = 0x402, 0x404          # TXT event types (drtm.md §4.1)


def digests(data: bytes) -> dict[str, bytes]:
    return {bank: hashlib.new(bank, data).digest() for bank in BANKS}


# What staging predicted (plan.json "drtm"): the sealing PCR's policy events.
PREDICTED = [
    (17, slrt.LABEL_INITRD, b"initrd bytes"),
    (17, slrt.LABEL_CMDLINE, CMDLINE.encode() + b"\0"),
    (17, slrt.LABEL_SLRT, b"INTEL_INFO with the addresses zeroed"),
]


def prediction() -> dict:
    return {"seal_pcr": 17, "events": [
        {"pcr": pcr, "label": label, "event_type": 0x502,
         "digests": {"sha256": hashlib.sha256(data).hexdigest()}}
        for pcr, label, data in PREDICTED]}


def launch_log(policy_events=PREDICTED, *, buffer: int = 64 << 10) -> tuple[bytes, dict]:
    """A DRTM log and the sha256 PCR 17/18 values a TPM would hold after it."""
    events = [(17, HASH_START, b"SINIT digest and EDX", b""),
              (17, MLE_HASH, b"the MLE pages", b"")]
    events += [(pcr, 0x502, data, label.encode() + b"\0") for pcr, label, data in policy_events]
    events += [(18, 0x502, b"zero page of this boot", slrt.LABEL_BOOT_PARAMS.encode() + b"\0")]
    log = eventlog.header(BANKS)
    pcrs = {17: bytes(32), 18: bytes(32)}
    for pcr, etype, data, label in events:
        d = digests(data)
        log += eventlog.serialize(eventlog.record(pcr, d, label, etype))
        pcrs[pcr] = hashlib.sha256(pcrs[pcr] + d["sha256"]).digest()
    log += bytes(buffer - len(log))
    return log, {pcr: value.hex() for pcr, value in pcrs.items()}
