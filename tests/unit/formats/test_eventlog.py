"""relaunchd's TCG crypto-agile measurement log: layout, round trip, replay, fuzz."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidEventLog
from relaunchd.formats import eventlog

BANKS = ("sha1", "sha256")


def _rec(label: str, pcr: int = 23, banks=BANKS) -> eventlog.Record:
    digests = {b: hashlib.new(b, label.encode()).digest() for b in banks}
    return eventlog.record(pcr, digests, eventlog.describe(label, digests.get("sha256", b""), "r1"))


def _log(*labels: str) -> bytes:
    log = b""
    for label in labels:
        log = eventlog.append(log, _rec(label))
    return log


def test_header_is_a_spec_id_event03():
    head = eventlog.header(["sha256", "sha1"])
    pcr, etype, digest, size = struct.unpack_from("<II20sI", head)
    assert (pcr, etype, digest) == (0, eventlog.EV_NO_ACTION, bytes(20))
    spec = head[32:]
    assert len(spec) == size == 16 + 4 + 4 + 4 + 2 * 4 + 1
    assert spec[:16] == b"Spec ID Event03\0"
    assert spec[20:24] == bytes([0, 2, 0, 2])            # minor, major, errata, uintnSize
    assert struct.unpack_from("<I", spec, 24)[0] == 2
    # Algorithms in registry order: sha1 (4, 20 bytes), sha256 (0xB, 32 bytes).
    assert struct.unpack_from("<HHHH", spec, 28) == (0x4, 20, 0xB, 32)


def test_event2_layout():
    rec = _rec("kernel")
    raw = eventlog.serialize(rec)
    assert struct.unpack_from("<III", raw) == (23, eventlog.EV_IPL, 2)
    assert struct.unpack_from("<H", raw, 12)[0] == 0x4
    assert raw[14:34] == rec.digest("sha1")
    assert struct.unpack_from("<H", raw, 34)[0] == 0xB
    assert raw[36:68] == rec.digest("sha256")
    assert struct.unpack_from("<I", raw, 68)[0] == len(rec.data)
    assert raw[72:] == rec.data
    assert rec.text.startswith("relaunchd:kernel sha256=") and rec.text.endswith(" id=r1")


def test_round_trip_and_replay():
    log = _log("kernel", "initrd", "cmdline")
    parsed = eventlog.parse_log(log)
    assert parsed.algorithms == (("sha1", 20), ("sha256", 32))
    assert list(parsed.records) == [_rec("kernel"), _rec("initrd"), _rec("cmdline")]
    for bank in BANKS:
        value = bytes(eventlog.DIGEST_SIZES[bank])
        for rec in parsed.records:
            value = hashlib.new(bank, value + rec.digest(bank)).digest()
        assert eventlog.replay(parsed.records, bank, 23) == value
    assert eventlog.replay(parsed.records, "sha256", 16) == bytes(32)   # other PCRs untouched
    ones = b"\xff" * 32
    assert eventlog.replay([], "sha256", 17, initial=ones) == ones


def test_replay_skips_no_action_and_needs_the_bank():
    no_action = eventlog.record(23, {"sha256": bytes(32)}, b"marker", eventlog.EV_NO_ACTION)
    assert eventlog.replay([no_action], "sha256", 23) == bytes(32)
    with pytest.raises(InvalidEventLog, match="no sha384 digest"):
        eventlog.replay([_rec("kernel")], "sha384", 23)
    with pytest.raises(ValueError):
        eventlog.replay([], "md5", 23)


def test_append_refuses_other_banks_and_bad_logs():
    log = _log("kernel")
    with pytest.raises(InvalidEventLog, match="differ"):
        eventlog.append(log, _rec("initrd", banks=("sha256",)))
    with pytest.raises(InvalidEventLog):
        eventlog.append(log[:-1], _rec("initrd"))
    with pytest.raises(ValueError):
        eventlog.record(23, {"sha256": bytes(20)}, b"")


@pytest.mark.parametrize("cut", [1, 10, 31, 40, 70, 77])
def test_truncation_is_named(cut):
    log = _log("kernel", "initrd")
    with pytest.raises(InvalidEventLog):
        eventlog.parse(log[:len(log) - cut] if cut < 70 else log[:cut])


def test_rejects_foreign_and_inconsistent_logs():
    log = bytearray(_log("kernel"))
    with pytest.raises(InvalidEventLog, match="Spec ID"):
        eventlog.parse(bytes(log[:32]) + b"Spec ID Event02\0" + bytes(log[48:]))
    bad_alg = bytearray(log)
    bad_alg[len(eventlog.header(BANKS)) + 12] = 0x0C        # sha384 not in header
    with pytest.raises(InvalidEventLog, match="not in the header"):
        eventlog.parse(bytes(bad_alg))
    too_many = bytearray(log)
    struct.pack_into("<I", too_many, len(eventlog.header(BANKS)) + 8, 3)
    with pytest.raises(InvalidEventLog, match="3 digests"):
        eventlog.parse(bytes(too_many))
    assert eventlog.parse(eventlog.header(BANKS)) == []


def test_foreign_algorithm_keeps_a_name():
    head = bytearray(eventlog.header(["sha256"]))
    struct.pack_into("<H", head, 32 + 28, 0x0027)                 # sha3_256, 32 bytes
    raw = struct.pack("<IIIH", 23, eventlog.EV_IPL, 1, 0x27) + bytes(32) + struct.pack("<I", 0)
    (rec,) = eventlog.parse(bytes(head) + raw)
    assert rec.banks == ("alg0x0027",)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutations_only_raise_invalid_event_log(data):
    log = bytearray(_log("kernel", "initrd", "cmdline"))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(log) - 1))
        log[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(log)))
    try:
        records = eventlog.parse(bytes(log[:cut]))
    except InvalidEventLog:
        return
    for bank in BANKS:
        with contextlib.suppress(InvalidEventLog):
            eventlog.replay(records, bank, 23)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(blob):
    for prefix in (b"", eventlog.header(BANKS)):
        with contextlib.suppress(InvalidEventLog):
            eventlog.parse(prefix + blob)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 23), st.binary(max_size=64)), max_size=8),
       st.lists(st.sampled_from(["sha1", "sha256", "sha384", "sha512"]), min_size=1,
                unique=True))
def test_round_trip_any_records(events, banks):
    log = b""
    expected = []
    for pcr, data in events:
        rec = eventlog.record(pcr, {b: hashlib.new(b, data).digest() for b in banks}, data)
        log = eventlog.append(log, rec)
        expected.append(rec)
    if log:
        assert eventlog.parse(log) == expected
