"""State records: atomic writes, interrupted writes, corrupt files recovered."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.engine.state import HistoryEntry, PendingRecord, StagedRecord, StateStore


def staged(n: int = 1) -> StagedRecord:
    return StagedRecord(id=f"id-{n}", path="/boot/efi/EFI/Linux/a.efi", method="kexec",
                        loader="file", kernel_sha256="ab" * 32, initrd_sha256=None,
                        cmdline="console=ttyS0 relaunchd.id=x", staged_at=state.now(),
                        predictions={"pcr11": {"sha256": "00" * 32}})


def pending() -> PendingRecord:
    return PendingRecord(id="id-1", time=state.now(), path="/boot/a.efi", method="txt",
                         loader="segments", kernel_sha256="cd" * 32, initrd_sha256="ef" * 32,
                         cmdline="x", handoff="systemd", boot_id="1234", force=True)


@pytest.fixture
def store(tmp_path) -> StateStore:
    return StateStore(str(tmp_path / "state"), str(tmp_path / "run"))


def corrupt_files(directory: str, name: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(name + ".corrupt-"))


def test_round_trips(store):
    assert store.load_staged() is None and store.load_pending() is None
    assert store.history() == []
    record, handed_off = staged(), pending()
    store.save_staged(record)
    store.save_pending(handed_off)
    assert store.load_staged() == record
    assert store.load_pending() == handed_off
    assert json.loads(Path(store.staged_path).read_text())["id"] == "id-1"
    assert os.path.dirname(store.staged_path) == store.runtime_dir
    assert os.path.dirname(store.pending_path) == store.state_dir
    assert store.clear_staged() is True and store.clear_staged() is False
    assert store.load_staged() is None
    assert store.clear_pending() and store.load_pending() is None


def test_records_are_frozen(store):
    with pytest.raises(AttributeError):
        staged().id = "x"   # type: ignore[misc]


def test_write_is_replace_not_append(store):
    store.save_staged(staged(1))
    store.save_staged(staged(2))
    assert store.load_staged().id == "id-2"
    assert os.listdir(store.runtime_dir) == [state.STAGED]   # no temp files left


def test_interrupted_write_never_read_as_record(tmp_path, monkeypatch):
    """A writer killed before its rename leaves a temp file; readers see the old
    record (or none), and the next start removes the leftover."""
    store = StateStore(str(tmp_path / "s"), str(tmp_path / "r"))
    store.save_staged(staged(1))

    def killed(src, dst):
        raise KeyboardInterrupt   # the moment of the kill: data written, not renamed

    real_rename = os.rename
    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save_staged(staged(2))
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.load_staged().id == "id-1"
    # simulate SIGKILL, where no cleanup ran: a half-written temp file
    leftover = Path(store.runtime_dir) / f".{state.STAGED}{state.TEMP_MARK}abc123"
    leftover.write_text('{"id": "id-3", "pa')
    assert store.load_staged().id == "id-1"
    leftover_pending = Path(store.state_dir) / f".{state.PENDING}{state.TEMP_MARK}zz"
    leftover_pending.write_text("{")
    assert store.load_pending() is None
    again = StateStore(store.state_dir, store.runtime_dir)
    assert not leftover.exists() and not leftover_pending.exists()
    assert again.load_staged().id == "id-1"


def test_write_fsyncs_file_and_directory(store, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.save_pending(pending())
    assert len(synced) == 2
    assert state.TEMP_MARK in synced[0]              # the data, before the rename
    assert synced[1] == store.state_dir              # the directory entry, after it


@pytest.mark.parametrize("content", [
    b"", b"{", b'{"id": "x"}', b"[1, 2]", b"\xff\xfe\x00garbage", b"null",
    b'{"id": 5, "path": "/a", "method": "kexec", "loader": "file", "kernel_sha256": "a", '
    b'"initrd_sha256": null, "cmdline": "", "staged_at": "t"}',
    b'{"id": "x", "path": "/a", "method": "kexec", "loader": "file", "kernel_sha256": "a", '
    b'"initrd_sha256": null, "cmdline": "", "staged_at": "t", "predictions": [1]}',
], ids=["empty", "truncated", "missing-fields", "list", "binary", "null", "wrong-type",
        "wrong-type-optional"])
def test_corrupt_staged_moved_aside(store, content, caplog):
    Path(store.staged_path).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="relaunchd.state"):
        assert store.load_staged() is None
    assert not os.path.exists(store.staged_path)
    moved = corrupt_files(store.runtime_dir, state.STAGED)
    assert len(moved) == 1
    assert (Path(store.runtime_dir) / moved[0]).read_bytes() == content
    assert "corrupt" in caplog.text and moved[0] in caplog.text
    assert store.recoveries and moved[0] in store.recoveries[0]
    assert store.load_staged() is None                  # and it stays absent, quietly
    store.save_staged(staged())
    assert store.load_staged().id == "id-1"


def test_corrupt_twice_in_one_second_keeps_both(store):
    for content in (b"{", b"}"):
        Path(store.pending_path).write_bytes(content)
        assert store.load_pending() is None
    assert len(corrupt_files(store.state_dir, state.PENDING)) == 2


def test_oversized_and_non_regular_records(store):
    Path(store.pending_path).write_bytes(b" " * (state.RECORD_LIMIT + 1))
    assert store.load_pending() is None
    os.mkfifo(store.staged_path)
    assert store.load_staged() is None                  # never blocks on a FIFO
    os.symlink("/etc/passwd", store.pending_path)
    assert store.load_pending() is None
    assert not os.path.lexists(store.pending_path)


def test_history_bounded_newest_last(tmp_path):
    store = StateStore(str(tmp_path / "s"), str(tmp_path / "r"), history_limit=5)
    for n in range(8):
        store.append_history(HistoryEntry(time=state.now(), event="staged", id=f"id-{n}",
                                          detail={"n": n}))
    entries = store.history()
    assert [e.id for e in entries] == [f"id-{n}" for n in range(3, 8)]
    assert [e.id for e in store.history(2)] == ["id-6", "id-7"]
    assert store.history(0) == []
    lines = Path(store.history_path).read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["detail"] == {"n": 7}


def test_history_with_garbage_lines_keeps_the_good_ones(store, caplog):
    store.append_history(HistoryEntry(time="t1", event="staged", id="a"))
    store.append_history(HistoryEntry(time="t2", event="cancelled", id="a"))
    with open(store.history_path, "ab") as f:
        f.write(b'{"time": "t3", "ev')          # truncated last line
    with open(store.history_path, "rb") as f:
        original = f.read()
    with caplog.at_level(logging.WARNING, logger="relaunchd.state"):
        entries = store.history()
    assert [e.time for e in entries] == ["t1", "t2"]
    assert "kept 2" in caplog.text and "line 3" in caplog.text
    moved = corrupt_files(store.state_dir, state.HISTORY)
    assert (Path(store.state_dir) / moved[0]).read_bytes() == original
    # the file was rewritten with the readable entries; appending works
    store.append_history(HistoryEntry(time="t4", event="staged"))
    assert [e.time for e in store.history()] == ["t1", "t2", "t4"]
    assert len(corrupt_files(store.state_dir, state.HISTORY)) == 1


def test_history_entirely_garbage(store):
    Path(store.history_path).write_bytes(b"\x00" * 100 + b"\nnot json\n[]\n")
    assert store.history() == []
    assert store.history() == []
    assert len(corrupt_files(store.state_dir, state.HISTORY)) == 1


def test_unreadable_record_is_absent_not_fatal(store, monkeypatch, caplog):
    store.save_staged(staged())
    real_open = os.open

    def denied(path, *a, **kw):
        if str(path) == store.staged_path:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    with caplog.at_level(logging.ERROR, logger="relaunchd.state"):
        assert store.load_staged() is None
    assert "cannot read" in caplog.text
