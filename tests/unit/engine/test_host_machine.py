"""The engine's machine on the real host (relaunchd.engine.host_machine). Nothing here loads,
unloads, hands off or quiesces on the host: the hand-off runs a fake systemctl from PATH."""

from __future__ import annotations

import os

import pytest

from relaunchd.errors import (
    InvalidArgument,
    RelaunchError,
)


def test_real_platform_handoff_runs_systemctl(tmp_path, monkeypatch):
    """The real hand-off queues kexec.target; a fake systemctl on PATH records it."""
    from relaunchd.engine.host_machine import HANDOFF_COMMAND, HostMachine

    log = tmp_path / "args"
    tool = tmp_path / "bin" / "systemctl"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\n[ -z "$FAIL" ] || {{ echo "$FAIL" >&2; '
                    'exit 1; }\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    platform = HostMachine()
    platform.handoff("systemd")
    assert log.read_text().split() == list(HANDOFF_COMMAND[1:])
    assert {"--job-mode=replace-irreversibly", "kexec.target"} <= set(HANDOFF_COMMAND)
    # Killed by the shutdown it started (systemd signals relaunchd's whole cgroup):
    # the hand-off was accepted.
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\nkill -TERM $$\n')
    platform.handoff("systemd")
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\n[ -z "$FAIL" ] || {{ echo "$FAIL" >&2; '
                    'exit 1; }\n')
    monkeypatch.setenv("FAIL", "Transaction is destructive.")
    with pytest.raises(RelaunchError, match="Transaction is destructive"):
        platform.handoff("systemd")
    with pytest.raises(InvalidArgument):
        platform.handoff("reboot")
