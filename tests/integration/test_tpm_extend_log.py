"""Measured relaunch against a software TPM: extend PCR 23, keep the log, replay it.

PCR 23 is the PC Client "application support" PCR, resettable at locality 0, so
each test starts it from zeros with `tpm2_pcrreset 23`. `tpm2_eventlog`
(tpm2-tools) is the independent reader of the log file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
import yaml

from relaunchd.errors import InvalidArgument, NotReady
from relaunchd.formats import eventlog
from relaunchd.platform import tpm_extend_log
from support.swtpm import running_swtpm
from support.tools import require


@pytest.fixture(autouse=True)
def _tools():
    require("swtpm", "tpm2_pcrreset", "tpm2_eventlog")

PCR = 23
BANKS = ("sha256", "sha1")
ITEMS_DATA = {"kernel": b"\x4d\x5a kernel bytes" * 100, "initrd": b"070701 initrd" * 50,
              "cmdline": b"root=/dev/vda1 ro relaunchd.id=r1"}


def _items(data: dict[str, bytes] = ITEMS_DATA):
    return [(label, {b: hashlib.new(b, blob).digest() for b in BANKS})
            for label, blob in data.items()]


def _reset(tcti: str) -> None:
    subprocess.run(["tpm2_pcrreset", "-T", tcti, str(PCR)], check=True, timeout=10)


@pytest.fixture
def tpm():
    with running_swtpm() as sw:
        _reset(sw.tcti)
        yield sw


def test_extend_replays_to_the_pcr(tpm, tmp_path):
    log_path = str(tmp_path / "state" / tpm_extend_log.LOG_NAME)
    records = tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path,
                              relaunch_id="r1")
    assert [r.text.split()[0] for r in records] == [
        "relaunchd:kernel", "relaunchd:initrd", "relaunchd:cmdline"]
    assert records[0].text == (f"relaunchd:kernel sha256="
                               f"{hashlib.sha256(ITEMS_DATA['kernel']).hexdigest()} id=r1")
    with open(log_path, "rb") as f:
        assert eventlog.parse(f.read()) == records
    # Beside the log only the TPM reset counter it belongs to; no temporary files.
    assert sorted(os.listdir(tmp_path / "state")) == [
        tpm_extend_log.LOG_NAME, tpm_extend_log.LOG_NAME + tpm_extend_log.EPOCH_SUFFIX]
    epoch_file = tpm_extend_log.LOG_NAME + tpm_extend_log.EPOCH_SUFFIX
    assert (tmp_path / "state" / epoch_file).read_text() \
        == f"{tpm_extend_log.reset_count(tpm.tcti)}\n"

    actual = tpm_extend_log.current_pcr(tpm.tcti, PCR, BANKS)
    for bank in BANKS:
        value = bytes(eventlog.DIGEST_SIZES[bank])
        for blob in ITEMS_DATA.values():
            value = hashlib.new(bank, value + hashlib.new(bank, blob).digest()).digest()
        assert actual[bank] == value
    verdict = tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS)
    assert verdict.ok, verdict.mismatches
    assert verdict.expected == {b: v.hex() for b, v in actual.items()}

    # A second relaunch without a TPM reset (kexec keeps PCR 23): the log keeps growing.
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items({"kernel": b"next"}),
                                  log_path=log_path, relaunch_id="r2")
    assert tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS).ok


def _tampered(log: bytes, how: str) -> bytes:
    records = eventlog.parse(log)
    if how == "digest":
        rec = records[1]
        digests = dict(rec.digests)
        digests["sha256"] = hashlib.sha256(b"evil initrd").digest()
        records[1] = eventlog.record(rec.pcr, digests, rec.data, rec.event_type)
    elif how == "dropped":
        del records[2]
    elif how == "reordered":
        records[0], records[1] = records[1], records[0]
    out = b""
    for rec in records:
        out = eventlog.append(out, rec)
    return out


@pytest.mark.parametrize("how", ["digest", "dropped", "reordered", "truncated", "removed"])
def test_tampered_log_is_detected(tpm, tmp_path, how):
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path)
    with open(log_path, "rb") as f:
        log = f.read()
    if how == "removed":
        os.unlink(log_path)
    else:
        with open(log_path, "wb") as f:
            f.write(log[:-3] if how == "truncated" else _tampered(log, how))
    verdict = tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS)
    assert not verdict.ok and verdict.mismatches
    if how == "digest":     # only the changed bank disagrees
        assert [m.split(":")[0] for m in verdict.mismatches] == ["PCR 23 sha256"]
    if how == "truncated":
        assert "truncated" in verdict.mismatches[0]


def test_log_and_tpm_from_different_runs_disagree(tmp_path):
    first, second = str(tmp_path / "a.log"), str(tmp_path / "b.log")
    with running_swtpm() as sw:
        _reset(sw.tcti)
        tpm_extend_log.extend_and_log(sw.tcti, PCR, BANKS, _items(), log_path=first,
                                      relaunch_id="r1")
    with running_swtpm() as sw:
        _reset(sw.tcti)
        other = dict(ITEMS_DATA, cmdline=b"root=/dev/vda1 ro relaunchd.id=r2")
        tpm_extend_log.extend_and_log(sw.tcti, PCR, BANKS, _items(other), log_path=second,
                                      relaunch_id="r2")
        assert tpm_extend_log.replay(second, sw.tcti, PCR, BANKS).ok
        verdict = tpm_extend_log.replay(first, sw.tcti, PCR, BANKS)
        assert not verdict.ok and len(verdict.mismatches) == 2


def test_tpm2_eventlog_reads_the_log(tpm, tmp_path):
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path,
                                  relaunch_id="r1")
    p = subprocess.run(["tpm2_eventlog", log_path], capture_output=True, text=True,
                       timeout=30, check=True)
    doc = yaml.safe_load(p.stdout)
    events = doc["events"]
    assert events[0]["EventType"] == "EV_NO_ACTION"
    assert [e["EventType"] for e in events[1:]] == ["EV_IPL"] * 3
    assert "relaunchd:initrd" in events[2]["Event"]["String"]
    actual = tpm_extend_log.current_pcr(tpm.tcti, PCR, BANKS)
    for bank in BANKS:
        assert int(doc["pcrs"][bank][PCR]) == int.from_bytes(actual[bank], "big")


def test_digests_for_a_memfd():
    blob = os.urandom(3 << 20)
    fd = os.memfd_create("staged")
    try:
        os.write(fd, blob)
        got = tpm_extend_log.digests_for(fd, len(blob), ("sha1", "sha256", "sha384"))
    finally:
        os.close(fd)
    assert got == {b: hashlib.new(b, blob).digest() for b in ("sha1", "sha256", "sha384")}


def test_no_tpm_is_a_named_not_ready(tmp_path):
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    with pytest.raises(NotReady, match="no TPM"):
        tpm_extend_log.extend_and_log(None, PCR, BANKS, _items(), log_path=log_path)
    with pytest.raises(NotReady, match="no TPM"):
        tpm_extend_log.extend_and_log("swtpm:host=127.0.0.1,port=1", PCR, BANKS, _items(),
                              log_path=log_path)
    assert not os.path.exists(log_path)


def test_bad_requests_change_nothing(tpm, tmp_path):
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    with pytest.raises(InvalidArgument, match="no sha384"):
        tpm_extend_log.extend_and_log(tpm.tcti, PCR, ("sha384",), _items(), log_path=log_path)
    with pytest.raises(InvalidArgument):
        tpm_extend_log.extend_and_log(tpm.tcti, 24, BANKS, _items(), log_path=log_path)
    assert not os.path.exists(log_path)
    assert tpm_extend_log.current_pcr(tpm.tcti, PCR, ("sha256",))["sha256"] == bytes(32)


def test_refused_extend_leaves_no_record(tpm, tmp_path):
    # PCR 17 (DRTM) cannot be extended at locality 0 (ecosystem.md §6.4).
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    with pytest.raises(NotReady, match="TPM refused"):
        tpm_extend_log.extend_and_log(tpm.tcti, 17, BANKS, _items(), log_path=log_path)
    assert not os.path.exists(log_path)


def test_interrupted_extend_is_cut_back(tpm, tmp_path):
    """Write-ahead: a daemon killed after writing the log but before the extends leaves
    whole records the PCR lacks; `recover` cuts exactly those, and the log replays."""
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path,
                                  relaunch_id="r1")
    with open(log_path, "rb") as f:
        good = f.read()
    ahead = good
    for label, digests in _items({"kernel": b"k2", "initrd": b"i2"}):
        ahead = eventlog.append(ahead, eventlog.record(
            PCR, digests, eventlog.describe(label, digests["sha256"], "r2")))
    with open(log_path, "wb") as f:
        f.write(ahead)
    assert not tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS).ok
    assert tpm_extend_log.recover(log_path, tpm.tcti, PCR, BANKS) == 2
    with open(log_path, "rb") as f:
        assert f.read() == good
    assert tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS).ok
    assert tpm_extend_log.recover(log_path, tpm.tcti, PCR, BANKS) == 0


def test_tampered_log_is_not_cut_back(tpm, tmp_path):
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path)
    with open(log_path, "rb") as f:
        tampered = _tampered(f.read(), "digest")
    with open(log_path, "wb") as f:
        f.write(tampered)
    assert tpm_extend_log.recover(log_path, tpm.tcti, PCR, BANKS) == 0
    with open(log_path, "rb") as f:
        assert f.read() == tampered


def test_tpm_reset_is_told_from_tampering(tpm, tmp_path):
    """A firmware reboot resets the TPM (TPM2_Startup(CLEAR)): the reset counter moves,
    verify says so instead of calling it tampering, and the next extend starts a new log
    with the old one archived."""
    log_path = str(tmp_path / tpm_extend_log.LOG_NAME)
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items(), log_path=log_path,
                                  relaunch_id="r1")
    before = tpm_extend_log.reset_count(tpm.tcti)
    subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{tpm.ctrl_port}", "-i"],
                   check=True, timeout=10, capture_output=True)
    subprocess.run(["tpm2_startup", "-c", "-T", tpm.tcti], check=True, timeout=10)
    assert tpm_extend_log.reset_count(tpm.tcti) == before + 1
    verdict = tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS)
    assert not verdict.ok
    assert "TPM was reset" in verdict.mismatches[0]
    tpm_extend_log.extend_and_log(tpm.tcti, PCR, BANKS, _items({"kernel": b"after reset"}),
                    log_path=log_path, relaunch_id="r2")
    assert tpm_extend_log.replay(log_path, tpm.tcti, PCR, BANKS).ok
    assert os.path.exists(f"{log_path}.reset-{before}")
    with open(log_path, "rb") as f:
        assert len(eventlog.parse(f.read())) == 1
