"""The engine's records on disk, written atomically (engine layer).

The records (DESIGN.md "Configuration and files"):
- `staged.json` in the runtime directory: the image loaded for the next
  relaunch. It lives in /run because a kexec load does not survive a reboot
  either; the engine reconciles it with /sys/kernel/kexec_loaded at start.
- `pending.json` in the state directory: a relaunch handed to systemd; read on
  the next boot to check what actually came up.
- `history.jsonl` in the state directory: one JSON object per line, newest
  last, bounded.
- `last-relaunch.json` in the state directory: the proof of the last relaunch
  (the LastRelaunch property), written by the boot it led to.
- in the runtime directory, for the system-shutdown hook: the quiesce plan of the
  staged image, the hand-off marker and the quiesce journal.

Every write goes to a temporary file in the same directory, is fsynced,
renamed over the record and the directory fsynced, so a daemon killed at any
point leaves either the old record or the new one — never half of one. A
leftover temporary file is never read as a record (readers open only the
final name) and is removed at the next start. A record that is nevertheless
unreadable (truncated, garbage, wrong shape) is moved aside as
`<name>.corrupt-<UTC time>` and logged; reading never raises for it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import stat
import threading
import typing
from dataclasses import dataclass, field
from typing import Any

from relaunchd.platform.atomic_file import TEMP_MARK, atomic_remove, atomic_write, fsync_dir

log = logging.getLogger("relaunchd.state")

STAGED = "staged.json"
PENDING = "pending.json"
HISTORY = "history.jsonl"
LAST_RELAUNCH = "last-relaunch.json"
QUIESCE_PLAN = "quiesce-plan.json"        # runtime dir: {"id", "plan"} for the shutdown hook
QUIESCE_JOURNAL = "quiesce-journal.jsonl"  # runtime dir: quiesce.Journal
HANDOFF = "handoff.json"                  # runtime dir: {"id"}: the hook may quiesce for it
HISTORY_LIMIT = 200
RECORD_LIMIT = 1 << 20           # a record is a few hundred bytes; refuse to slurp more
HISTORY_BYTES_LIMIT = 16 << 20


def now() -> str:
    """The time format of every record: ISO 8601, UTC, seconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------ records

class _Record:
    """JSON round trip with shape checks: a record that does not match its
    fields exactly is corrupt, not half-used."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is not dataclasses.MISSING or \
                        f.default_factory is not dataclasses.MISSING:
                    continue
                raise ValueError(f"missing field {f.name!r}")
            value = data[f.name]
            if not _matches(value, hints[f.name]):
                raise ValueError(f"field {f.name!r} has the wrong type "
                                 f"({type(value).__name__})")
            values[f.name] = value
        return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is not None and origin not in (dict, list):
        return any(_matches(value, h) for h in typing.get_args(hint))
    kind = origin or hint
    if kind is type(None):
        return value is None
    if kind in (int, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True)
class StagedRecord(_Record):
    id: str
    path: str
    method: str
    loader: str
    kernel_sha256: str
    initrd_sha256: str | None
    cmdline: str
    staged_at: str
    predictions: dict = field(default_factory=dict)   # PCR 11 per bank, from staging
    digests: dict = field(default_factory=dict)       # item -> bank -> hex, for measuring
    quiesce: dict = field(default_factory=dict)       # summary of the quiesce plan
    # The boot loader entry it was staged from (platform.boot_entries'
    # ListedEntry.staged_record); empty for an image staged by path.
    entry: dict = field(default_factory=dict)
    signed: list = field(default_factory=lambda: ["image"])   # what a verified signature covers
    unsigned: list = field(default_factory=list)              # staged parts no one signed
    # txt: the DL handler file staged with it ({"path", "sha256"}); empty otherwise.
    dl_handler: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PendingRecord(_Record):
    id: str
    time: str
    path: str
    method: str
    loader: str
    kernel_sha256: str
    initrd_sha256: str | None
    cmdline: str
    handoff: str                     # "systemd" | "immediate" | "reboot" (fallback)
    boot_id: str | None              # the boot that handed off; the next one must differ
    force: bool = False
    predictions: dict = field(default_factory=dict)
    handoff_at: float = 0.0          # epoch seconds, for the downtime
    measurement: dict = field(default_factory=dict)   # measured, pcr, banks, reset_count, ...
    fallback_reason: str | None = None                # set when this is a fallback reboot


@dataclass(frozen=True)
class HistoryEntry(_Record):
    time: str
    event: str                       # staged, stage-failed, cancelled, relaunch-started, ...
    id: str | None = None
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------ atomic files

def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# ------------------------------------------------------------------ the store

class StateStore:
    """The three records under `state_dir` and `runtime_dir`. Thread-safe."""

    def __init__(self, state_dir: str, runtime_dir: str, *,
                 history_limit: int = HISTORY_LIMIT) -> None:
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.history_limit = history_limit
        self.recoveries: list[str] = []      # what was moved aside, for status output
        self._lock = threading.Lock()
        for directory in (state_dir, runtime_dir):
            os.makedirs(directory, mode=0o755, exist_ok=True)
            self._remove_temp_files(directory)

    @property
    def staged_path(self) -> str:
        return os.path.join(self.runtime_dir, STAGED)

    @property
    def pending_path(self) -> str:
        return os.path.join(self.state_dir, PENDING)

    @property
    def last_relaunch_path(self) -> str:
        return os.path.join(self.state_dir, LAST_RELAUNCH)

    @property
    def history_path(self) -> str:
        return os.path.join(self.state_dir, HISTORY)

    # staged / pending
    def load_staged(self) -> StagedRecord | None:
        with self._lock:
            return self._load(self.staged_path, StagedRecord)

    def save_staged(self, record: StagedRecord) -> None:
        with self._lock:
            atomic_write(self.staged_path, _dumps(record.to_json()))

    def clear_staged(self) -> bool:
        with self._lock:
            return atomic_remove(self.staged_path)

    def load_pending(self) -> PendingRecord | None:
        with self._lock:
            return self._load(self.pending_path, PendingRecord)

    def save_pending(self, record: PendingRecord) -> None:
        with self._lock:
            atomic_write(self.pending_path, _dumps(record.to_json()))

    def clear_pending(self) -> bool:
        with self._lock:
            return atomic_remove(self.pending_path)

    def load_last_relaunch(self) -> dict[str, Any]:
        with self._lock:
            raw = self._read(self.last_relaunch_path, RECORD_LIMIT)
            if raw is None:
                return {}
            try:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
                return value
            except (ValueError, UnicodeDecodeError) as exc:
                self._quarantine(self.last_relaunch_path, str(exc))
                return {}

    def save_last_relaunch(self, value: dict[str, Any]) -> None:
        with self._lock:
            atomic_write(self.last_relaunch_path, _dumps(value))

    # runtime files for the shutdown hook (they die with the boot, as the kexec load does)
    def save_runtime(self, name: str, value: dict[str, Any]) -> None:
        with self._lock:
            atomic_write(os.path.join(self.runtime_dir, name), _dumps(value))

    def load_runtime(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            path = os.path.join(self.runtime_dir, name)
            raw = self._read(path, RECORD_LIMIT)
            if raw is None:
                return None
            try:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
                return value
            except (ValueError, UnicodeDecodeError) as exc:
                self._quarantine(path, str(exc))
                return None

    def clear_runtime(self, name: str) -> bool:
        with self._lock:
            return atomic_remove(os.path.join(self.runtime_dir, name))

    def runtime_path(self, name: str) -> str:
        return os.path.join(self.runtime_dir, name)

    # history
    def history(self, limit: int | None = None) -> list[HistoryEntry]:
        """Newest last; at most `limit` entries (the newest ones)."""
        with self._lock:
            entries = self._read_history()
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return entries

    def append_history(self, entry: HistoryEntry) -> None:
        with self._lock:
            entries = [*self._read_history(), entry][-self.history_limit:]
            data = "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in entries)
            atomic_write(self.history_path, data.encode())

    # internals
    def _load(self, path: str, cls: type) -> Any:
        raw = self._read(path, RECORD_LIMIT)
        if raw is None:
            return None
        try:
            return cls.from_json(json.loads(raw))       # type: ignore[attr-defined]
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            self._quarantine(path, str(exc) or type(exc).__name__)
            return None

    def _read_history(self) -> list[HistoryEntry]:
        raw = self._read(self.history_path, HISTORY_BYTES_LIMIT)
        if raw is None:
            return []
        entries: list[HistoryEntry] = []
        bad: list[str] = []
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entries.append(HistoryEntry.from_json(json.loads(line)))
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                bad.append(f"line {number}: {exc}")
        if bad:
            # Keep what is readable; the original goes aside for inspection.
            self._quarantine(self.history_path, "; ".join(bad[:3])
                             + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""),
                             kept=len(entries))
            data = "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in entries)
            atomic_write(self.history_path, data.encode())
        return entries

    def _read(self, path: str, limit: int) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._quarantine(path, "is a symbolic link")
            else:
                log.error("state: cannot read %s: %s; treating it as absent", path,
                          exc.strerror)
            return None
        chunks: list[bytes] = []
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            size = 0
            while regular and size <= limit:
                chunk = os.read(fd, limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if not regular:
            self._quarantine(path, "is not a regular file")
            return None
        data = b"".join(chunks)
        if len(data) > limit:
            self._quarantine(path, f"larger than {limit} bytes")
            return None
        return data

    def _quarantine(self, path: str, why: str, kept: int | None = None) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = f"{path}.corrupt-{stamp}"
        n = 1
        while os.path.lexists(target):
            target = f"{path}.corrupt-{stamp}-{n}"
            n += 1
        try:
            os.rename(path, target)
            fsync_dir(os.path.dirname(path) or ".")
            moved = f"moved aside to {target}"
        except OSError as exc:
            # Never loop on the same bad file: drop it if it cannot be kept.
            try:
                os.unlink(path)
                moved = f"could not move it aside ({exc.strerror}); removed it"
            except OSError:
                moved = f"could not move it aside or remove it ({exc.strerror})"
        message = f"state: {path} is corrupt ({why}); {moved}" + (
            f"; kept {kept} readable entries" if kept is not None else "")
        log.warning(message)
        self.recoveries.append(message)

    def _remove_temp_files(self, directory: str) -> None:
        """Temporary files of a writer that was killed before its rename."""
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and TEMP_MARK in name:
                try:
                    os.unlink(os.path.join(directory, name))
                    log.info("state: removed %s, left by an interrupted write",
                             os.path.join(directory, name))
                except OSError:
                    pass
