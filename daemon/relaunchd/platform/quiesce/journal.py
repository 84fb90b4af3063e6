"""Quiesce, part 2: the journal (platform layer).

Every quiesce action is appended to a journal file and fsynced *before* the store that
performs it, with the value it changes (ecosystem.md §4.4), so a rollback — by this process
or by a daemon restarted after a crash — knows exactly what to undo.

Reading checks every entry against what `execute` writes, with ASCII patterns matched in
full: a CPU number is `0` or `[1-9][0-9]*` (str.isdigit() accepts "²", and int() turns
"٣" into 3), an address the full PCI form, a driver a sysfs driver name. An entry that does
not match is never acted on: it is returned apart (`rejected`, with its line) for the
rollback to report.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from relaunchd.errors import QuiesceFailed
from relaunchd.platform.atomic_file import fsync_dir
from relaunchd.platform.quiesce.plan import DRIVER_NAME, FULL_PCI_ADDRESS

# Actions in the journal. Each names its inverse in `execute._undo`.
CPU_OFFLINE = "cpu-offline"
DRIVER_UNBIND = "driver-unbind"
ROLLED_BACK = "rolled-back"      # marker: everything above it has been undone

CPU_NUMBER = re.compile(r"0|[1-9][0-9]{0,5}", re.ASCII)
CPU_ONLINE_VALUE = re.compile(r"[01]", re.ASCII)   # what cpuN/online reads


@dataclass(frozen=True)
class JournalEntry:
    action: str
    target: str
    previous: str

    def to_line(self) -> bytes:
        return (json.dumps({"action": self.action, "target": self.target,
                            "previous": self.previous}, sort_keys=True) + "\n").encode()


@dataclass
class JournalContents:
    """What a journal says has not been rolled back yet."""

    entries: list[JournalEntry] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)   # (line, why)

    @property
    def pending(self) -> int:
        return len(self.entries) + len(self.rejected)


def entry_problem(entry: JournalEntry) -> str | None:
    """Why `entry` is not one `execute` could have written, or None."""
    if entry.action == CPU_OFFLINE:
        if not CPU_NUMBER.fullmatch(entry.target):
            return f"{entry.target!r} is not a CPU number"
        if not CPU_ONLINE_VALUE.fullmatch(entry.previous):
            return f"{entry.previous!r} is not a CPU online value"
    elif entry.action == DRIVER_UNBIND:
        if not FULL_PCI_ADDRESS.fullmatch(entry.target):
            return f"{entry.target!r} is not a PCI address"
        if not DRIVER_NAME.fullmatch(entry.previous) or entry.previous in (".", ".."):
            return f"{entry.previous!r} is not a driver name"
    elif entry.action == ROLLED_BACK:
        if entry.target or entry.previous:
            return "a rolled-back marker carries no target"
    else:
        return f"unknown action {entry.action!r}"
    return None


def _entry(raw: bytes) -> JournalEntry:
    d = json.loads(raw)
    values = [d["action"], d["target"], d["previous"]]
    if not all(isinstance(v, str) for v in values):
        raise TypeError("action, target and previous must be strings")
    return JournalEntry(*values)


class Journal:
    """Append-only, fsynced-per-entry action journal (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> JournalContents:
        """Entries not yet rolled back, and the lines that fail the checks."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return JournalContents()
        except OSError as exc:
            raise QuiesceFailed(f"cannot read quiesce journal {self.path}: {exc}") from exc
        contents = JournalContents()
        last = len(lines) - 1
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                entry = _entry(raw)
            except (ValueError, KeyError, TypeError) as exc:
                # A torn last line is an entry whose store never started (the entry is
                # fsynced before the store): nothing to undo. Anywhere else the line was
                # an action nobody can read any more.
                if i != last:
                    contents.rejected.append((i + 1, f"unreadable ({exc})"))
                continue
            problem = entry_problem(entry)
            if problem is not None:
                contents.rejected.append((i + 1, f"{entry.action}: {problem}"))
            elif entry.action == ROLLED_BACK:
                contents.entries, contents.rejected = [], []
            else:
                contents.entries.append(entry)
        return contents

    def open_for_execute(self) -> None:
        contents = self.read()
        if contents.pending:
            raise QuiesceFailed(f"quiesce journal {self.path} holds {contents.pending} "
                                "actions that were not rolled back; roll it back first")
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
