"""relaunchd's own measurement log in the TCG crypto-agile binary format (formats layer).

Layout (TCG PC Client Platform Firmware Profile, PFP, §10.2; drtm.md §4.4), all
little-endian:

* first record: a TPM 1.2-style ``TCG_PCR_EVENT`` — PCR 0, ``EV_NO_ACTION``, a
  20-byte zero digest — whose data is ``TCG_EfiSpecIDEvent`` ("Spec ID
  Event03", spec 2.0, the list of {algorithmId, digestSize}) (PFP §10.4.5.1);
* then ``TCG_PCR_EVENT2`` records: u32 pcrIndex, u32 eventType,
  ``TPML_DIGEST_VALUES`` (u32 count, {u16 hashAlg, digest}×count), u32
  eventSize, event data (PFP §10.2.2).

This is the form the kernel exports in securityfs and the one `tpm2_eventlog`
reads, so a verifier needs no relaunchd-specific tooling.

Event type: ``EV_IPL`` (0xD) with a UTF-8 description as event data, e.g.
``relaunchd:kernel sha256=<hex> id=<relaunch id>`` — what boot loaders use for
"the OS loader measured this" (GRUB, and systemd-stub for PCR 11; PFP §10.4.1),
and which `tpm2_eventlog` prints as a string. ``EV_EVENT_TAG`` would need a
registered tag id and shows as opaque bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from relaunchd.errors import InvalidEventLog

EV_NO_ACTION = 0x3    # PFP §10.4.1: not extended, informational (e.g. the Spec ID header)
EV_IPL = 0xD

# TCG Algorithm Registry ids and digest sizes.
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D,
           "sm3_256": 0x0012}
DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
_ALG_NAMES = {v: k for k, v in ALG_IDS.items()}

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")   # signature .. numberOfAlgorithms
_HEADER_EVENT = struct.Struct("<II20sI")       # TCG_PCR_EVENT up to eventSize
_EVENT2_HEAD = struct.Struct("<III")           # pcrIndex, eventType, digests.count
UINTN_64 = 2                                   # uintnSize: 1 = UINT32, 2 = UINT64
MAX_EVENT_DATA = 1 << 20                       # far more than any description we write


@dataclass(frozen=True)
class Record:
    """One ``TCG_PCR_EVENT2``: digests in log order as (bank, digest) pairs."""

    pcr: int
    event_type: int
    digests: tuple[tuple[str, bytes], ...]
    data: bytes

    def digest(self, bank: str) -> bytes | None:
        return next((d for b, d in self.digests if b == bank), None)

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(b for b, _ in self.digests)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class EventLog:
    """A parsed log: the banks the Spec ID header declares, and the records after it."""

    algorithms: tuple[tuple[str, int], ...]    # (bank, digest size) in header order
    records: tuple[Record, ...]


def describe(label: str, digest: bytes, relaunch_id: str = "", *, bank: str = "sha256") -> bytes:
    """Event data for one measured item: ``relaunchd:<label> <bank>=<hex>[ id=<id>]``."""
    if not label or any(c.isspace() for c in label):
        raise ValueError(f"bad label {label!r}")
    text = f"relaunchd:{label} {bank}={digest.hex()}"
    if relaunch_id:
        text += f" id={relaunch_id}"
    return text.encode()


def record(pcr: int, digests: Mapping[str, bytes], data: bytes,
           event_type: int = EV_IPL) -> Record:
    """A record with digests in the canonical bank order (registry id order)."""
    ordered = tuple(sorted(digests.items(), key=lambda kv: _alg_id(kv[0])))
    for bank, value in ordered:
        if len(value) != DIGEST_SIZES.get(bank, -1):
            raise ValueError(f"{bank} digest must be {DIGEST_SIZES.get(bank)} bytes, "
                             f"not {len(value)}")
    return Record(pcr, event_type, ordered, bytes(data))


def header(banks: Iterable[str]) -> bytes:
    """The ``TCG_PCR_EVENT`` carrying ``TCG_EfiSpecIDEvent`` for these banks (PFP §10.4.5.1)."""
    algs = sorted(set(banks), key=_alg_id)
    if not algs:
        raise ValueError("a log needs at least one bank")
    spec = _SPEC_ID_FIXED.pack(SPEC_ID_SIGNATURE, 0,   # platformClass 0: client
                               0, 2, 0, UINTN_64,      # spec 2.0, errata 0
                               len(algs))
    spec += b"".join(struct.pack("<HH", _alg_id(a), DIGEST_SIZES[a]) for a in algs)
    spec += b"\0"                                      # vendorInfoSize = 0
    return _HEADER_EVENT.pack(0, EV_NO_ACTION, bytes(20), len(spec)) + spec


def serialize(rec: Record) -> bytes:
    out = [_EVENT2_HEAD.pack(rec.pcr, rec.event_type, len(rec.digests))]
    out += [struct.pack("<H", _alg_id(bank)) + value for bank, value in rec.digests]
    out.append(struct.pack("<I", len(rec.data)) + rec.data)
    return b"".join(out)


def append(log: bytes, rec: Record) -> bytes:
    """`log` (empty: a new log with a header for `rec`'s banks) plus `rec`.

    Every record must carry exactly the banks the header declares (PFP §10.2.2:
    one digest per active bank), else the log could not be replayed per bank."""
    if not log:
        log = header(rec.banks)
    declared = parse_log(log).algorithms
    if sorted(rec.banks) != sorted(b for b, _ in declared):
        raise InvalidEventLog(f"record banks {sorted(rec.banks)} differ from the log's "
                              f"{sorted(b for b, _ in declared)}")
    return log + serialize(rec)


def parse(data: bytes) -> list[Record]:
    return list(parse_log(data).records)


def parse_log(data: bytes, *, zero_tail: bool = False) -> EventLog:
    """Strict parse: every length is bounded by the buffer; any leftover byte is an error.
    `zero_tail`: the log sits in a fixed-size buffer (the DRTM log) whose unused end is
    zeros; an all-zero remainder ends the log instead of being an error."""
    view = memoryview(bytes(data))
    if len(view) < _HEADER_EVENT.size:
        raise InvalidEventLog("too short for the Spec ID header event")
    pcr, etype, digest, size = _HEADER_EVENT.unpack_from(view, 0)
    if pcr != 0 or etype != EV_NO_ACTION or digest != bytes(20):
        raise InvalidEventLog("first event is not an EV_NO_ACTION Spec ID event")
    pos = _HEADER_EVENT.size
    spec = _take(view, pos, size, "Spec ID event")
    pos += size
    algorithms = _spec_id(spec)
    sizes = dict(algorithms)
    records: list[Record] = []
    while pos < len(view):
        if zero_tail and not any(view[pos:]):
            break
        where = f"event {len(records) + 1} at offset {pos}"
        pcr, etype, count = _unpack(_EVENT2_HEAD, view, pos, where)
        pos += _EVENT2_HEAD.size
        if count == 0 or count > len(algorithms):
            raise InvalidEventLog(f"{where}: {count} digests, header declares "
                                  f"{len(algorithms)}")
        digests: list[tuple[str, bytes]] = []
        for _ in range(count):
            (alg,) = _unpack(struct.Struct("<H"), view, pos, where)
            bank = _alg_name(alg)
            if bank not in sizes:
                raise InvalidEventLog(f"{where}: algorithm {alg:#06x} not in the header")
            if any(b == bank for b, _ in digests):
                raise InvalidEventLog(f"{where}: two {bank} digests")
            value = _take(view, pos + 2, sizes[bank], where)
            digests.append((bank, value))
            pos += 2 + sizes[bank]
        (size,) = _unpack(struct.Struct("<I"), view, pos, where)
        if size > MAX_EVENT_DATA:
            raise InvalidEventLog(f"{where}: event data of {size} bytes")
        event = _take(view, pos + 4, size, where)
        pos += 4 + size
        records.append(Record(pcr, etype, tuple(digests), event))
    return EventLog(algorithms, tuple(records))


def replay(records: Sequence[Record], bank: str, pcr: int,
           initial: bytes | None = None) -> bytes:
    """The PCR value the records produce: v ← H(v ‖ digest) per extending record.

    `initial` defaults to zeros (the reset value of PCRs 0–16 and 23). EV_NO_ACTION
    events are never extended (PFP §10.4.1)."""
    size = DIGEST_SIZES.get(bank)
    if size is None:
        raise ValueError(f"unknown bank {bank!r}")
    value = bytes(size) if initial is None else bytes(initial)
    if len(value) != size:
        raise ValueError(f"initial {bank} value must be {size} bytes")
    for index, rec in enumerate(records):
        if rec.pcr != pcr or rec.event_type == EV_NO_ACTION:
            continue
        digest = rec.digest(bank)
        if digest is None:
            raise InvalidEventLog(f"event {index + 1} (PCR {pcr}) has no {bank} digest")
        value = hashlib.new(bank, value + digest).digest()
    return value


def _spec_id(spec: bytes) -> tuple[tuple[str, int], ...]:
    if len(spec) < _SPEC_ID_FIXED.size:
        raise InvalidEventLog("Spec ID event too short")
    sig, _cls, _minor, major, _errata, _uintn, count = _SPEC_ID_FIXED.unpack_from(spec, 0)
    if sig != SPEC_ID_SIGNATURE or major != 2:
        raise InvalidEventLog("not a crypto-agile log (no \"Spec ID Event03\", spec 2.x)")
    end = _SPEC_ID_FIXED.size + 4 * count + 1
    if count == 0 or count > 16 or len(spec) < end:
        raise InvalidEventLog(f"Spec ID event: bad algorithm count {count}")
    algorithms: list[tuple[str, int]] = []
    for i in range(count):
        alg, size = struct.unpack_from("<HH", spec, _SPEC_ID_FIXED.size + 4 * i)
        name = _alg_name(alg)
        if alg == 0 or size == 0 or size > 64 or any(n == name for n, _ in algorithms):
            raise InvalidEventLog(f"Spec ID event: bad algorithm {alg:#06x}/{size}")
        if name in DIGEST_SIZES and DIGEST_SIZES[name] != size:
            raise InvalidEventLog(f"Spec ID event: {name} declared with {size} bytes")
        algorithms.append((name, size))
    vendor = spec[end - 1]
    if len(spec) != end + vendor:
        raise InvalidEventLog("Spec ID event: vendorInfoSize does not match the event size")
    return tuple(algorithms)


def _alg_id(bank: str) -> int:
    if bank in ALG_IDS:
        return ALG_IDS[bank]
    if bank.startswith("alg0x"):
        return int(bank[5:], 16)
    raise ValueError(f"unknown bank {bank!r}")


def _alg_name(alg: int) -> str:
    # Unknown algorithms keep a stable name so foreign logs still parse.
    return _ALG_NAMES.get(alg, f"alg{alg:#06x}")


def _take(view: memoryview, pos: int, size: int, where: str) -> bytes:
    if pos + size > len(view):
        raise InvalidEventLog(f"{where}: truncated ({size} bytes at {pos}, "
                              f"log is {len(view)})")
    return bytes(view[pos:pos + size])


def _unpack(fmt: struct.Struct, view: memoryview, pos: int, where: str) -> tuple:
    return fmt.unpack(_take(view, pos, fmt.size, where))
