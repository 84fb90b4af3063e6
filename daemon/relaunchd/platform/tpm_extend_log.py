"""Measured relaunch (platform layer): extend digests into a PCR and keep the matching log.

Before the hand-off the digests of the staged kernel, initrd and cmdline are
extended into one PCR (default 23, the PC Client "application support" PCR,
which kexec does not reset) in every configured bank, and one ``EV_IPL`` record
per item is appended to relaunchd's own TCG crypto-agile log (`eventlog`) in
the state directory. After the new kernel starts, `verify` replays the log and
compares with the TPM: "the measurement log replays to the current PCR value".

TPM access is tpm2-pytss ESAPI (ecosystem.md §6.4), imported only when used.
Crash safety is write-ahead: the records are appended to the log (fsynced) *before*
the extends, and the log is cut back to the records the TPM accepted when a command
fails. A daemon killed in between leaves a log that is ahead of the PCR by whole
records; `recover` finds that (the PCR equals the replay of a prefix of the log) and
cuts the log back, so a log that replays is always the truth about the PCR.

A log is only meaningful for one TPM power cycle: PCR 23 is zeroed by a TPM reset
(a firmware reboot), not by a kexec. The TPM's reset counter
(TPMS_CLOCK_INFO.resetCount, TPM 2.0 Part 2 §10.11.1) is kept beside the log; a log
from an earlier cycle is archived, never extended or replayed against the new PCR.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relaunchd.errors import InvalidArgument, InvalidEventLog, NoTpm, TpmFailed
from relaunchd.formats import eventlog
from relaunchd.formats.eventlog import Record
from relaunchd.formats.hashing import Sink, feed
from relaunchd.platform.atomic_file import atomic_write
from relaunchd.platform.tpm import import_pytss

LOG_NAME = "measurements.log"       # under the state directory, e.g. /var/lib/relaunchd/
EPOCH_SUFFIX = ".reset-count"       # beside the log: the TPM reset counter it belongs to
DEFAULT_PCR = 23
DEFAULT_BANKS = ("sha256",)


@dataclass(frozen=True)
class ReplayResult:
    ok: bool
    expected: dict[str, str]        # bank -> hex PCR value the log replays to
    actual: dict[str, str]          # bank -> hex PCR value read from the TPM
    mismatches: tuple[str, ...]     # human-readable, one per disagreeing bank or log problem


def digests_for(fd: int, size: int, banks: Sequence[str]) -> dict[str, bytes]:
    """Digests of bytes [0, size) of `fd` (a staged memfd) in every bank, in one read pass."""
    hashers = {bank: hashlib.new(bank) for bank in banks}
    feed(fd, [Sink(h, [(0, size)]) for h in hashers.values()])
    return {bank: h.digest() for bank, h in hashers.items()}


def tcti_for(tcti_or_device: str | None) -> str:
    """A TCTI string: `device:/dev/tpmrm0` from a bare device path, others unchanged."""
    if not tcti_or_device:
        raise NoTpm("no TPM")
    if tcti_or_device.startswith("/"):
        return f"device:{tcti_or_device}"
    return tcti_or_device


def extend_and_log(tcti_or_device: str | None, pcr: int, banks: Sequence[str],
           items: Sequence[tuple[str, Mapping[str, bytes]]], *, log_path: str,
           relaunch_id: str = "") -> list[Record]:
    """Extend each item's digests into `pcr` (all `banks` at once, TPM2_PCR_Extend)
    and append one record per item to the log at `log_path`.

    Raises NoTpm when there is no TPM or tpm2-pytss — the caller decides (by config)
    whether an unmeasured relaunch is allowed — and TpmFailed when the TPM refuses."""
    if not 0 <= pcr <= 23:
        raise InvalidArgument(f"PCR {pcr} out of range")
    banks = tuple(banks)
    if not banks:
        raise InvalidArgument("no PCR banks to extend")
    records = []
    for label, digests in items:
        missing = [b for b in banks if b not in digests]
        if missing:
            raise InvalidArgument(f"{label}: no {', '.join(missing)} digest")
        chosen = {b: digests[b] for b in banks}
        named = "sha256" if "sha256" in chosen else banks[0]
        try:
            records.append(eventlog.record(
                pcr, chosen, eventlog.describe(label, chosen[named], relaunch_id, bank=named)))
        except ValueError as exc:
            raise InvalidArgument(f"{label}: {exc}") from exc
    with _esapi(tcti_for(tcti_or_device)) as (ectx, pytss):
        old = _current_epoch_log(log_path, _reset_count(ectx))
        if old:
            eventlog.parse_log(old)     # refuse to extend if the log we would append to is bad
        ahead = old
        for rec in records:
            ahead = eventlog.append(ahead, rec)
        _write_log(log_path, ahead)     # write-ahead: see the module docstring
        handle = getattr(pytss.ESYS_TR, f"PCR{pcr}")
        done: list[Record] = []
        try:
            for rec in records:
                values = pytss.TPML_DIGEST_VALUES([
                    # TPMU_HA needs a dict: `digest=bytes` is rejected (ecosystem.md §6.4).
                    pytss.TPMT_HA(hashAlg=eventlog.ALG_IDS[bank],
                                  digest=pytss.TPMU_HA(**{bank: value}))
                    for bank, value in rec.digests])
                ectx.pcr_extend(handle, values)
                done.append(rec)
        except Exception as exc:
            log = old
            for rec in done:
                log = eventlog.append(log, rec)
            if log:
                _write_log(log_path, log)
            else:
                os.unlink(log_path)
            if not done:
                raise TpmFailed(f"TPM refused the extend: {exc}") from exc
            raise TpmFailed(f"TPM refused the extend after {len(done)} of "
                            f"{len(records)} items: {exc}") from exc
    return done


def reset_count(tcti_or_device: str | None) -> int:
    """The TPM's reset counter: +1 at every TPM2_Startup(CLEAR), i.e. every firmware boot."""
    with _esapi(tcti_for(tcti_or_device)) as (ectx, _pytss):
        return _reset_count(ectx)


def recover(log_path: str, tcti_or_device: str | None, pcr: int,
            banks: Sequence[str]) -> int:
    """Cut the log back to what the PCR holds after an interrupted `extend`.

    Returns how many trailing records were dropped (0: the log already replays, or no
    prefix of it does — then it is left alone for `verify` to report)."""
    with _esapi(tcti_for(tcti_or_device)) as (ectx, pytss):
        data = _current_epoch_log(log_path, _reset_count(ectx))
        if not data:
            return 0
        actual = _read_pcr(ectx, pytss, pcr, banks)
    try:
        parsed = eventlog.parse_log(data)
    except InvalidEventLog:
        return 0
    records = list(parsed.records)
    for dropped in range(len(records) + 1):
        kept = records[:len(records) - dropped]
        if all(eventlog.replay(kept, b, pcr) == actual[b] for b in banks):
            if dropped:
                log = b""
                for rec in kept:
                    log = eventlog.append(log, rec)
                if not kept:
                    log = eventlog.header(b for b, _ in parsed.algorithms)
                _write_log(log_path, log)
            return dropped
    return 0


def current_pcr(tcti_or_device: str | None, pcr: int, banks: Sequence[str]) -> dict[str, bytes]:
    """The PCR's value in each bank; TpmFailed if a bank is not allocated."""
    with _esapi(tcti_for(tcti_or_device)) as (ectx, pytss):
        return _read_pcr(ectx, pytss, pcr, banks)


def replay(log_path: str, tcti_or_device: str | None, pcr: int,
           banks: Sequence[str]) -> ReplayResult:
    """Replay the log for `pcr` in every bank and compare with the TPM.

    A missing log replays to the reset value (zeros); an unreadable or malformed log
    is a mismatch, not an exception — a tampered log must be reported, loudly."""
    with _esapi(tcti_for(tcti_or_device)) as (ectx, pytss):
        actual = {b: v.hex() for b, v in _read_pcr(ectx, pytss, pcr, banks).items()}
        count = _reset_count(ectx)
    recorded = _read(log_path + EPOCH_SUFFIX).strip().decode(errors="replace")
    if recorded and recorded != str(count):
        return ReplayResult(False, {}, actual, (
            f"log {log_path} belongs to TPM reset count {recorded}, the TPM is at {count}: "
            f"the TPM was reset (a firmware reboot), so PCR {pcr} no longer holds it",))
    try:
        data = _read(log_path)
        records = eventlog.parse(data) if data else []
        expected = {b: eventlog.replay(records, b, pcr).hex() for b in banks}
    except (OSError, InvalidEventLog, ValueError) as exc:
        return ReplayResult(False, {}, actual, (f"log {log_path}: {exc}",))
    mismatches = tuple(f"PCR {pcr} {b}: log replays to {expected[b]}, TPM has {actual[b]}"
                       for b in banks if expected[b] != actual[b])
    return ReplayResult(not mismatches, expected, actual, mismatches)


def _read_pcr(ectx: Any, pytss: Any, pcr: int, banks: Sequence[str]) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    for bank in banks:
        _counter, _sel, digests = ectx.pcr_read(pytss.TPML_PCR_SELECTION.parse(f"{bank}:{pcr}"))
        got = [bytes(d) for d in digests]
        if len(got) != 1:
            raise TpmFailed(f"PCR {pcr} is not allocated in the {bank} bank")
        values[bank] = got[0]
    return values


class _Pytss:
    """The few tpm2-pytss names used here, resolved at first use."""

    def __init__(self) -> None:
        try:
            tpm2_pytss = import_pytss()
        except ImportError as exc:
            raise NoTpm(f"no TPM: tpm2-pytss not available ({exc})") from exc
        self.ESAPI = tpm2_pytss.ESAPI
        self.ESYS_TR = tpm2_pytss.ESYS_TR
        self.TPML_DIGEST_VALUES = tpm2_pytss.TPML_DIGEST_VALUES
        self.TPML_PCR_SELECTION = tpm2_pytss.TPML_PCR_SELECTION
        self.TPMT_HA = tpm2_pytss.TPMT_HA
        self.TPMU_HA = tpm2_pytss.TPMU_HA


@contextmanager
def _esapi(tcti: str) -> Iterator[tuple[Any, _Pytss]]:
    pytss = _Pytss()
    try:
        ectx = pytss.ESAPI(tcti)
    except Exception as exc:  # TSS2_Exception or a TCTI load error: no usable TPM
        raise NoTpm(f"no TPM: cannot open {tcti}: {exc}") from exc
    try:
        yield ectx, pytss
    finally:
        ectx.close()


def _reset_count(ectx: Any) -> int:
    try:
        return int(ectx.read_clock().clockInfo.resetCount)
    except Exception as exc:
        raise TpmFailed(f"TPM refused ReadClock: {exc}") from exc


def _current_epoch_log(log_path: str, count: int) -> bytes:
    """The log if it belongs to this TPM power cycle; else archive it and start anew."""
    data = _read(log_path)
    epoch_path = log_path + EPOCH_SUFFIX
    recorded = _read(epoch_path).strip()
    if data and recorded != str(count).encode():
        # From an earlier cycle (or from before the counter was kept): PCR 23 was reset
        # since, so it cannot replay any more. Keep it for the verifier, out of the way.
        old = recorded.decode(errors="replace") or "unknown"
        os.replace(log_path, f"{log_path}.reset-{old}")
        data = b""
    if recorded != str(count).encode():
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), mode=0o700, exist_ok=True)
        atomic_write(epoch_path, f"{count}\n".encode())
    return data


def _write_log(log_path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), mode=0o700, exist_ok=True)
    atomic_write(log_path, data)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


