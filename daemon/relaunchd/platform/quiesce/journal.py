"""Quiesce, part 2: the journal (platform layer).

Every quiesce action is appended to a journal file and fsynced *before* the store that
performs it, with the value it changes (ecosystem.md §4.4), so a rollback — by this process
or by a daemon restarted after a crash — knows exactly what to undo.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from relaunchd.errors import QuiesceFailed
from relaunchd.platform.atomic_file import fsync_dir

# Actions in the journal. Each names its inverse in `execute._undo`.
CPU_OFFLINE = "cpu-offline"
DRIVER_UNBIND = "driver-unbind"
ROLLED_BACK = "rolled-back"      # marker: everything above it has been undone


@dataclass(frozen=True)
class JournalEntry:
    action: str
    target: str
    previous: str

    def to_line(self) -> bytes:
        return (json.dumps({"action": self.action, "target": self.target,
                            "previous": self.previous}, sort_keys=True) + "\n").encode()


class Journal:
    """Append-only, fsynced-per-entry action journal (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> tuple[list[JournalEntry], list[str]]:
        """Entries not yet rolled back, and notes on lines that could not be used."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise QuiesceFailed(f"cannot read quiesce journal {self.path}: {exc}") from exc
        entries: list[JournalEntry] = []
        notes: list[str] = []
        last = len(lines) - 1
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
                entry = JournalEntry(str(d["action"]), str(d["target"]), str(d["previous"]))
            except (ValueError, KeyError, TypeError):
                # A torn last line is an entry whose store never started (the entry is
                # fsynced before the store): nothing to undo.
                if i != last:
                    notes.append(f"journal line {i + 1} unreadable; skipped")
                continue
            if entry.action == ROLLED_BACK:
                entries = []
            else:
                entries.append(entry)
        return entries, notes

    def open_for_execute(self) -> None:
        pending, _ = self.read()
        if pending:
            raise QuiesceFailed(f"quiesce journal {self.path} holds {len(pending)} actions "
                                "that were not rolled back; roll it back first")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def append(self, entry: JournalEntry) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            data = entry.to_line()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)
