"""relaunchd's state as a Prometheus node-exporter textfile (text exposition format 0.0.4);
an adapter over the engine, written by the daemon (`TextfileExporter`).

node-exporter's textfile collector reads `*.prom` in its directory on every scrape, so
the file is replaced atomically (platform.atomic_file) under a temp name that does not end in
`.prom`: a scrape sees the previous snapshot or the new one, never half of either.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relaunchd.platform.atomic_file import atomic_write

log = logging.getLogger("relaunchd.prometheus")

PREFIX = "relaunchd_"
TEXTFILE_MODE = 0o644          # node-exporter usually runs as its own user
RESULTS = ("verified", "unverified")   # always exported, so rate() works from the first scrape
HISTORY_SCAN = 1 << 16                 # every entry the history keeps (it is bounded)


@dataclass(frozen=True)
class Metrics:
    staged: bool
    last_relaunch: dict[str, Any]      # the engine's LastRelaunch record; {} before the first
    relaunches_total: dict[str, int]   # result ("verified", "unverified") -> count
    state: str                         # the engine's state name
    # Firmware + boot loader time the concluded relaunches avoided (history entries'
    # firmware_avoided_usec; unknown counts 0), microseconds.
    firmware_saved_usec: int = 0


# --- format helpers ------------------------------------------------------------------------

def _escape_label(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # Whole seconds print as integers ("1795345200", not "1795345200.0"); repr() is the
    # shortest string that round-trips, which Go's ParseFloat reads back exactly.
    return str(int(value)) if value.is_integer() else repr(value)


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, Any], float | int | bool]]) -> list[str]:
    full = PREFIX + name
    lines = [f"# HELP {full} {_escape_help(help_text)}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


def _unix_seconds(value: Any) -> float | None:
    """The ISO 8601 hand-off time as unix seconds; None when it is not a parsable time."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        # The engine writes UTC; reading a naive time as local would shift it by the
        # daemon's TZ.
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _downtime_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value / 1000


def _usec(value: Any) -> int | None:
    """A whole, non-negative number of microseconds, or None (unknown, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


# --- rendering -----------------------------------------------------------------------------

def _last_relaunch_lines(last: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    timestamp = _unix_seconds(last.get("time"))
    if timestamp is not None:
        lines += _family("last_relaunch_timestamp_seconds", "gauge",
                         "Unix time of the last relaunch's hand-off to the new kernel.",
                         [({}, timestamp)])
    lines += _family("last_relaunch_verified", "gauge",
                     "1 if the last relaunch was verified after the new boot.",
                     [({}, bool(last.get("verified")))])
    lines += _family("last_relaunch_measured", "gauge",
                     "1 if the last relaunch was measured into the TPM.",
                     [({}, bool(last.get("measured")))])
    lines += _family("last_relaunch_drtm", "gauge",
                     "1 if the last relaunch was a DRTM (dynamic launch).",
                     [({}, bool(last.get("drtm")))])
    downtime = _downtime_seconds(last.get("downtime_ms"))
    if downtime is not None:
        lines += _family("last_relaunch_downtime_seconds", "gauge",
                         "Downtime of the last relaunch, from hand-off to the new system up.",
                         [({}, downtime)])
    firmware = last.get("firmware_time")
    avoided = _usec(firmware.get("avoided_usec")) if isinstance(firmware, dict) else None
    if avoided is not None:
        lines += _family("last_relaunch_firmware_avoided_seconds", "gauge",
                         "Firmware and boot loader time the last relaunch avoided (0: it "
                         "went through firmware).",
                         [({}, avoided / 1e6)])
    lines += _family("last_relaunch_info", "gauge",
                     "The last relaunch's id, method and image; the value is always 1.",
                     [({"id": last.get("id", ""), "method": last.get("method", ""),
                        "image": last.get("image", "")}, 1)])
    return lines


def render(m: Metrics) -> str:
    """The text exposition: fixed family order, one HELP and TYPE per family, final newline."""
    lines = _family("staged", "gauge", "1 if an image is staged (loaded for relaunch).",
                    [({}, m.staged)])
    lines += _family("state", "gauge", "The relaunch engine's current state (value is 1).",
                     [({"state": m.state}, 1)])
    if m.last_relaunch:
        lines += _last_relaunch_lines(m.last_relaunch)
    counts = dict.fromkeys(RESULTS, 0)
    counts.update(m.relaunches_total)
    ordered = [*RESULTS, *sorted(set(counts) - set(RESULTS))]
    lines += _family("relaunches_total", "counter", "Relaunches performed, by result.",
                     [({"result": result}, int(counts[result])) for result in ordered])
    lines += _family("firmware_seconds_saved_total", "counter",
                     "Firmware and boot loader time relaunches avoided, from the last cold "
                     "boot's figures (unknown counts 0).",
                     [({}, m.firmware_saved_usec / 1e6)])
    return "\n".join(lines) + "\n"


def write_textfile(path: str, m: Metrics) -> None:
    """Replace `path` atomically with `render(m)`, mode 0644.

    Creates nothing but the file: a missing directory raises FileNotFoundError naming
    the directory (the caller logs it and carries on)."""
    try:
        atomic_write(path, render(m).encode(), mode=TEXTFILE_MODE)
    except FileNotFoundError:
        directory = os.path.dirname(path) or "."
        if os.path.isdir(directory):
            raise
        # atomic_write's error names its temp file, which is not what the admin must fix.
        raise FileNotFoundError(errno.ENOENT, "metrics textfile directory does not exist",
                                directory) from None


class TextfileExporter:
    """Keeps the textfile in step with an engine: rewritten when the state, the staged image
    or the last relaunch changed (the daemon calls it with the engine's change names), and
    not when only progress moved."""

    WATCHED = frozenset({"state", "staged_image", "last_relaunch"})

    def __init__(self, engine: Any, path: str | None) -> None:
        self.engine = engine
        self.path = path
        self._seen: tuple | None = None

    def __call__(self, names: set[str]) -> None:
        if self.path and names & self.WATCHED:
            self.export()

    def export(self) -> None:
        if not self.path:
            return
        last = self.engine.last_relaunch
        staged = bool(self.engine.staged_image)
        current = (self.engine.state, staged, last.get("id"), last.get("verified"))
        if current == self._seen:
            return
        self._seen = current
        totals = dict.fromkeys(RESULTS, 0)
        saved_usec = 0
        for entry in self.engine.history(limit=HISTORY_SCAN):
            result = entry.get("event", "").removeprefix("relaunch-")
            if result in totals:
                totals[result] += 1
                detail = entry.get("detail") or {}
                saved_usec += _usec(detail.get("firmware_avoided_usec")) or 0
        try:
            write_textfile(self.path, Metrics(staged=staged, last_relaunch=last,
                                              relaunches_total=totals, state=current[0],
                                              firmware_saved_usec=saved_usec))
        except OSError as exc:
            log.warning("cannot write the metrics textfile %s: %s", self.path, exc)
