"""History as the real engine writes it, read over the bus (issue #14, item 11): newest
first, with the engine's field names (`time`, `event`, `id`, `detail`), through
`GetHistory`, `relaunchctl history --json` and plain `relaunchctl history`.

The fake engine of the other bus tests hid both defects (oldest first, and the CLI
printing `result`, which the engine never writes, as `?`): here the daemon runs the real
engine over the side-effect-free machine and real verification."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from relaunchd.bus import client as bus_client
from support.dbus_harness import Daemon, PrivateBus, relaunchctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"
FIELDS = {"time", "event", "id", "detail"}


@pytest.fixture(scope="module")
def bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture
def daemon(bus, tmp_path, real_ukis, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    shutil.copy(real_ukis["signed"], images / "good.efi")
    shutil.copy(real_ukis["signed-other"], images / "untrusted.efi")
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "vm-no-tpm" / "root", root, symlinks=True)
    for d in ("state", "run"):
        (tmp_path / d).mkdir()
    config = tmp_path / "relaunchd.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(root), "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(images)],
        "trust": {"certificates": [str(keys["db"].cert)]}, "launch": {"method": "kexec"}}))
    d = Daemon(bus, config, engine="fake-machine").start()
    yield images
    d.stop()


def test_history_is_newest_first_with_the_engines_fields(bus, daemon):
    images = daemon
    staged = json.loads(relaunchctl(bus, "stage", "--json", str(images / "good.efi")).stdout)
    rejected = relaunchctl(bus, "stage", str(images / "untrusted.efi"))
    assert rejected.returncode == 1
    assert relaunchctl(bus, "cancel").returncode == 0

    entries = bus_client.Client(address=bus.address).call("GetHistory")
    assert [e["event"] for e in entries] == ["unstaged", "stage-failed", "staged"]
    for entry in entries:
        assert set(entry) == FIELDS, entry
    assert entries[0]["id"] == entries[2]["id"] == staged["id"]
    assert entries[1]["id"] != staged["id"]
    assert entries[0]["detail"] == {"why": "cancelled"}
    assert entries[1]["detail"]["error"] == "VerificationFailed"
    assert entries[2]["detail"]["path"] == str(images / "good.efi")
    times = [datetime.datetime.fromisoformat(e["time"]) for e in entries]
    assert times == sorted(times, reverse=True)

    r = relaunchctl(bus, "history", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == entries
    r = relaunchctl(bus, "history", "--json", "-n", "1")
    assert json.loads(r.stdout) == entries[:1]

    r = relaunchctl(bus, "history")
    assert r.returncode == 0, r.stderr
    heads = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert [line.split()[1] for line in heads] == ["unstaged", "stage-failed", "staged"]
    assert [line.split()[2] for line in heads] == [e["id"] for e in entries]
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line) for line in heads), heads
    assert "?" not in r.stdout.split()
