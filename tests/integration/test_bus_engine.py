"""relaunchd with the real engine on a private bus: bad config, missing TPM, a kexec
syscall that fails (this host kernel has no kexec: ENOSYS), SIGKILL mid-staging and
restart, a corrupt state file, and relaunch --wait through a fake hand-off.

Relaunch is only ever called with the test-only fake platform
(tests/support/dbus_fake_machine.py): its hand-off writes a file, nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from relaunchd.bus import client as bus_client
from support.dbus_harness import VENV_BIN, Daemon, PrivateBus, relaunchctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"


@pytest.fixture(scope="module")
def private_bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture
def setup(tmp_path, real_ukis, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    shutil.copy(real_ukis["signed"], images / "signed.efi")
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "vm-no-tpm" / "root", root, symlinks=True)
    for d in ("state", "run"):
        (tmp_path / d).mkdir()
    config = {"root": str(root), "state_dir": str(tmp_path / "state"),
              "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(images)],
              "trust": {"certificates": [str(keys["db"].cert)]},
              "launch": {"method": "kexec"}}
    path = tmp_path / "relaunchd.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"config": path, "image": images / "signed.efi", "dir": tmp_path}


def start(private_bus, setup, engine: str = "fake-machine", **env) -> Daemon:
    return Daemon(private_bus, setup["config"], engine=engine, env=env).start()


def wait_for(client, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        props = client.properties()
        if predicate(props):
            return props
        time.sleep(0.05)
    raise AssertionError(f"timed out; last properties: {props}")


def test_bad_config_names_key_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("state_dir: /tmp\nlaunch:\n  metod: kexec\n")
    r = subprocess.run([str(VENV_BIN / "relaunchd"), "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "InvalidConfig" in r.stderr and "metod" in r.stderr and "line 3" in r.stderr
    r = subprocess.run([str(VENV_BIN / "relaunchd"), "--config", str(path), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "line 3" in r.stderr


def test_missing_tpm_is_reported_not_fatal(private_bus, setup):
    d = start(private_bus, setup, engine="installed")
    try:
        client = bus_client.Client(address=private_bus.address)
        props = client.properties()
        assert props["State"] == "idle"
        report = client.call("Check")
        assert "tpm" in json.dumps(report).lower()
        r = relaunchctl(private_bus, "status", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["State"] == "idle"
    finally:
        d.stop()


def test_kexec_syscall_fails_cleanly(private_bus, setup):
    """The real platform: verification passes, kexec_file_load fails (ENOSYS here)."""
    d = start(private_bus, setup, engine="installed")
    try:
        r = relaunchctl(private_bus, "stage", str(setup["image"]))
        assert r.returncode == 1, r.stderr
        assert "KexecFailed:" in r.stderr
        client = bus_client.Client(address=private_bus.address)
        props = client.properties()
        assert props["State"] == "failed"
        assert props["LastError"]["name"] == "KexecFailed"
        assert props["StagedImage"] == {}
        assert not (setup["dir"] / "run" / "staged.json").exists()
    finally:
        d.stop()


def test_sigkill_mid_staging_then_restart(private_bus, setup):
    d = start(private_bus, setup, FAKE_LOAD_DELAY="30")
    client = bus_client.Client(address=private_bus.address)
    client.call("Stage", str(setup["image"]))
    wait_for(client, lambda p: p["Progress"].get("step") == "loading")
    d.stop(signal.SIGKILL)
    d = start(private_bus, setup)
    try:
        client = bus_client.Client(address=private_bus.address)
        props = client.properties()
        assert props["State"] in ("idle", "failed") and props["StagedImage"] == {}
        assert not (setup["dir"] / "run" / "staged.json").exists()
    finally:
        d.stop()


def test_sigkill_when_staged_then_restart_and_relaunch(private_bus, setup):
    d = start(private_bus, setup)
    r = relaunchctl(private_bus, "stage", "--json", str(setup["image"]))
    assert r.returncode == 0, r.stderr
    ident = json.loads(r.stdout)["id"]
    d.stop(signal.SIGKILL)
    d = start(private_bus, setup)
    try:
        client = bus_client.Client(address=private_bus.address)
        props = client.properties()
        assert props["State"] == "staged" and props["StagedImage"]["id"] == ident
        r = relaunchctl(private_bus, "relaunch", "--wait", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == ident
        assert (setup["dir"] / "run" / "fake-handoffs").read_text() == "systemd\n"
        assert (setup["dir"] / "state" / "pending.json").exists()
        history = json.loads(relaunchctl(private_bus, "history", "--json").stdout)
        assert any(h.get("id") == ident for h in history)
    finally:
        d.stop()


def test_relaunch_reply_survives_the_shutdown_it_starts(private_bus, setup):
    """systemd stops relaunchd as soon as kexec.target is queued; the daemon still
    answers the Relaunch call with the id before it exits."""
    d = start(private_bus, setup, FAKE_HANDOFF_STOPS_US="1")
    try:
        r = relaunchctl(private_bus, "stage", "--json", str(setup["image"]))
        assert r.returncode == 0, r.stderr
        ident = json.loads(r.stdout)["id"]
        r = relaunchctl(private_bus, "relaunch", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == ident
        d.proc.wait(timeout=15)
        assert d.proc.returncode == 0, d.output()
        assert (setup["dir"] / "state" / "pending.json").exists()
    finally:
        d.stop()


def test_corrupt_state_file(private_bus, setup):
    staged = setup["dir"] / "run" / "staged.json"
    staged.write_text("{not json")
    d = start(private_bus, setup)
    try:
        client = bus_client.Client(address=private_bus.address)
        assert client.get("State") == "idle"
        assert not staged.exists()
        assert list(staged.parent.glob("staged.json.corrupt-*"))
    finally:
        d.stop()


def test_relaunch_fallback_reboot_through_the_cli(private_bus, setup):
    """Nothing staged: `relaunch --fallback reboot` queues an ordinary reboot (the fake
    hand-off records its kind) instead of failing, and records why."""
    d = start(private_bus, setup)
    try:
        r = relaunchctl(private_bus, "relaunch", "--json")
        assert r.returncode == 1 and "NotStaged" in r.stderr      # no fallback: as before
        r = relaunchctl(private_bus, "relaunch", "--fallback", "reboot", "--json")
        assert r.returncode == 0, r.stderr
        ident = json.loads(r.stdout)["id"]
        assert (setup["dir"] / "run" / "fake-handoffs").read_text().split() == ["reboot"]
        pending = json.loads((setup["dir"] / "state" / "pending.json").read_text())
        assert pending["id"] == ident and pending["method"] == "firmware-reboot"
        history = json.loads(relaunchctl(private_bus, "history", "--json").stdout)
        assert history[0]["event"] == "relaunch-fallback"
        assert history[0]["detail"]["error"] == "NotStaged"
    finally:
        d.stop()
