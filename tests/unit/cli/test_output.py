"""Output helpers of relaunchctl (relaunchd.cli.output): JSON that never fails on a value,
sizes in binary units, and a progress line drawn only on a terminal for large work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from relaunchd.cli import output


def test_json_on_stdout_with_any_value(capsys):
    output.print_json({"path": Path("/boot/x.efi"), "n": 1, "ok": None})
    out = capsys.readouterr().out
    assert out.endswith("}\n")
    assert json.loads(out) == {"path": "/boot/x.efi", "n": 1, "ok": None}


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (119 * 1024 * 1024, "119.0 MiB"), (3 << 30, "3.0 GiB"), (5 << 40, "5120.0 GiB"),
])
def test_sizes(n, text):
    assert output.human_size(n) == text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert output.progress_printer("staging") is None


def test_progress_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    times = iter([10.0, 10.05, 10.2, 10.3])
    monkeypatch.setattr(output.time, "monotonic", lambda: next(times))
    report = output.progress_printer("staging x.efi", minimum=1000)
    report(10, 100)                       # small work: never drawn
    report(0, 4096)
    report(1024, 4096)                    # within 100 ms of the last line: skipped
    report(2048, 4096)
    report(4096, 4096)                    # done: always drawn, with a newline
    assert terminal.getvalue() == ("\rstaging x.efi:   0% of 4.0 KiB"
                                   "\rstaging x.efi:  50% of 4.0 KiB"
                                   "\rstaging x.efi: 100% of 4.0 KiB\n")
