"""units/kernel-install/90-relaunchd.install, run by Debian 12's own kernel-install
(252) with a fake `relaunchctl` first on PATH that records its arguments.

What it must do: on `add`, ask `relaunchctl stage --next-boot --if-auto-stage --json`
(the daemon decides from `auto_stage`); on `remove`, ask
`relaunchctl cancel --if-entry TOKEN-KVER --if-kernel KVER --json`; and never fail the
kernel installation: relaunchctl missing, failing or hanging is logged and the plugin
(hence kernel-install) exits 0. kernel-install is confined to a temporary BOOT_ROOT and
configuration directory, and runs no plugin but ours (KERNEL_INSTALL_PLUGINS).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support import tools

PLUGIN = Path(__file__).resolve().parents[2] / "units" / "kernel-install" / \
    "90-relaunchd.install"
KVER = "6.1.0-99-amd64"
TOKEN = "0123456789abcdef0123456789abcdef"

FAKE = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
[ -n "$FAKE_SLEEP" ] && sleep "$FAKE_SLEEP"
[ -n "$FAKE_OUTPUT" ] && echo "$FAKE_OUTPUT"
[ -n "$FAKE_ERROR" ] && echo "$FAKE_ERROR" >&2
exit "${FAKE_STATUS:-0}"
"""


@pytest.fixture
def setup(tmp_path):
    tools.require("kernel-install")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "relaunchctl"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    boot = tmp_path / "boot"
    (boot / "loader" / "entries").mkdir(parents=True)
    (boot / TOKEN).mkdir()                      # layout=bls, as on a systemd-boot machine
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "cmdline").write_text("root=/dev/vda ro\n")
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("kernel")
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "BOOT_ROOT": str(boot),
           "MACHINE_ID": TOKEN, "KERNEL_INSTALL_CONF_ROOT": str(conf),
           "KERNEL_INSTALL_PLUGINS": str(PLUGIN), "FAKE_LOG": str(tmp_path / "calls"),
           "TMPDIR": str(tmp_path)}
    return env, kernel, tmp_path


def kernel_install(env: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kernel-install", *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=120)


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls"
    return log.read_text().splitlines() if log.exists() else []


def test_add_asks_relaunchd_to_stage_the_next_boot_entry(setup):
    env, kernel, tmp = setup
    proc = kernel_install(env, "add", KVER, str(kernel),
                          FAKE_OUTPUT='{"staged": true, "entry": "x.conf"}')
    assert proc.returncode == 0, proc.stderr
    assert calls(tmp) == ["stage --next-boot --if-auto-stage --json"]
    assert f"staging the next boot entry after adding kernel {KVER}" in proc.stderr
    assert '{"staged": true, "entry": "x.conf"}' in proc.stderr


def test_remove_cancels_only_that_kernels_stage(setup):
    env, kernel, tmp = setup
    proc = kernel_install(env, "remove", KVER)
    assert proc.returncode == 0, proc.stderr
    assert calls(tmp) == [f"cancel --if-entry {TOKEN}-{KVER} --if-kernel {KVER} --json"]


@pytest.mark.parametrize(("status", "error"), [
    (1, "relaunchctl: VerificationFailed: signature 1: signed by CN=x, not trusted"),
    (2, "relaunchctl: NoDaemon: relaunchd is not running"),
    (3, "Traceback (most recent call last): ..."),
])
def test_a_refusal_never_fails_the_installation(setup, status, error):
    env, kernel, tmp = setup
    for args in (("add", KVER, str(kernel)), ("remove", KVER)):
        proc = kernel_install(env, *args, FAKE_STATUS=str(status), FAKE_ERROR=error)
        assert proc.returncode == 0, proc.stderr
        assert f"failed (exit {status}), kernel installation unaffected: {error}" in proc.stderr


def test_relaunchctl_missing(setup):
    env, kernel, tmp = setup
    env = {**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if Path("/usr/bin/relaunchctl").exists() or Path("/usr/sbin/relaunchctl").exists():
        pytest.fail("a real relaunchctl on the system PATH would be called", pytrace=False)
    proc = kernel_install(env, "add", KVER, str(kernel))
    assert proc.returncode == 0, proc.stderr
    assert f"relaunchctl is not installed: kernel {KVER} not staged" in proc.stderr
    assert calls(tmp) == []


def test_a_hanging_relaunchctl_is_cut_off(setup):
    env, kernel, tmp = setup
    proc = kernel_install(env, "add", KVER, str(kernel), FAKE_SLEEP="30",
                          RELAUNCHD_KERNEL_INSTALL_TIMEOUT="1")
    assert proc.returncode == 0, proc.stderr
    assert "did not finish within 1s" in proc.stderr
    assert calls(tmp) == ["stage --next-boot --if-auto-stage --json"]


def test_other_commands_do_nothing(setup):
    env, _, tmp = setup
    for args in (["inspect"], ["frobnicate", KVER]):
        proc = subprocess.run([str(PLUGIN), *args], env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0 and proc.stderr == ""
    assert calls(tmp) == []


def test_plugin_passes_shellcheck_and_is_executable():
    tools.require("shellcheck")
    assert os.access(PLUGIN, os.X_OK)
    proc = subprocess.run(["shellcheck", "--shell=sh", str(PLUGIN)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
