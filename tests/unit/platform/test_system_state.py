"""platform.system_state: systemd's SystemState word from `systemctl is-system-running`,
whatever its exit status; None when systemctl is missing, hangs, or prints a word it
never prints for a known state ("unknown", "offline"). A fake systemctl on PATH stands in
for systemd (never the host's, whose answer is not ours to script)."""

from __future__ import annotations

import os

import pytest

from relaunchd.platform import system_state


def fake_systemctl(tmp_path, monkeypatch, body: str) -> None:
    script = tmp_path / "systemctl"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = is-system-running ] || exit 99\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.parametrize("word, status", [("running", 0), ("degraded", 1),
                                          ("stopping", 1), ("starting", 1)])
def test_the_state_word_whatever_the_exit_status(tmp_path, monkeypatch, word, status):
    fake_systemctl(tmp_path, monkeypatch, f"echo {word}; exit {status}")
    assert system_state.manager_state() == word


@pytest.mark.parametrize("body", ["echo unknown; exit 4", "echo offline; exit 1",
                                  "exit 1", "echo 'Failed to connect to bus'; exit 1"])
def test_cannot_tell_is_none(tmp_path, monkeypatch, body):
    fake_systemctl(tmp_path, monkeypatch, body)
    assert system_state.manager_state() is None


def test_no_systemctl_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert system_state.manager_state() is None


def test_a_hanging_systemctl_is_none_after_the_timeout(tmp_path, monkeypatch):
    fake_systemctl(tmp_path, monkeypatch, "exec sleep 5")
    assert system_state.manager_state(timeout=0.2) is None


def test_going_down_is_a_state_systemctl_prints():
    assert system_state.GOING_DOWN in system_state.STATES
    assert os.path.basename(system_state.SYSTEMCTL[0]) == "systemctl"
