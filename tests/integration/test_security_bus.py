"""No local user can starve relaunchd's privileged calls (issue #14, item 3): unprivileged
callers (`runuser -u nobody`) keep hundreds of `Check` calls outstanding while root stages
and cancels, through the shipped bus policy, with the real engine over the
side-effect-free machine (tests/support/dbus_fake_machine.py).

The threshold is loose for a shared 2-core machine: root's p99 under the flood must stay
below 3 s (the code before issue #14 took 7–9 s here, because root's calls queued behind
every Check in one worker pool; benchmarks/bus_starvation.py prints the figures). And a
Relaunch must never run after its caller gave up waiting for the reply."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from relaunchd.bus import client as bus_client
from relaunchd.bus import names
from support.bus_flood import admin_rounds, percentile, start_flood
from support.dbus_harness import Daemon, PrivateBus, relaunchctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runuser)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"
CALLERS, IN_FLIGHT = 8, 40          # ~300 outstanding Checks, as in the issue
ROOT_P99_LIMIT = 3.0


@pytest.fixture(scope="module")
def bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture
def site(bus, tmp_path, real_ukis, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    shutil.copy(real_ukis["signed"], images / "good.efi")
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
    yield {"image": str(images / "good.efi"), "run": tmp_path / "run", "daemon": d}
    d.stop()


def test_root_is_not_starved_by_a_check_flood(bus, site):
    flood = start_flood(bus, callers=CALLERS, in_flight=IN_FLIGHT)
    try:
        time.sleep(2)                                   # let the flood build up
        rounds = admin_rounds(bus, site["image"], 3)
        # an unprivileged monitor that waits for its reply is still answered
        status = relaunchctl(bus, "status", "--json", user="nobody", timeout=120)
    finally:
        flooded = flood.stop()
    p99 = percentile(rounds.all_s, 0.99)
    assert p99 < ROOT_P99_LIMIT, (rounds.stage_s, rounds.cancel_s)
    assert status.returncode == 0 and json.loads(status.stdout)["State"] == "idle"
    answered = sum(f["counts"]["answered"] for f in flooded)
    busy = sum(f["counts"]["busy"] for f in flooded)
    assert answered > 0                  # Check still works for everyone ...
    assert busy > 0                      # ... but the queue is bounded: the rest is Busy
    assert all(f["counts"]["other"] == 0 for f in flooded), flooded


def test_a_relaunch_never_runs_after_its_caller_gave_up(bus, site):
    client = bus_client.Client(address=bus.address)
    ident = client.call("Stage", site["image"])
    deadline = time.monotonic() + 120
    while client.get("State") != "staged" and time.monotonic() < deadline:
        time.sleep(0.05)
    handoffs = site["run"] / "fake-handoffs"
    flood = start_flood(bus, callers=CALLERS, in_flight=IN_FLIGHT)
    try:
        time.sleep(2)
        call = subprocess.run(
            ["gdbus", "call", "--system", "--timeout", "5", "-d", names.BUS_NAME,
             "-o", names.OBJECT_PATH, "-m", f"{names.INTERFACE}.Relaunch", "{}"],
            env=bus.env(), capture_output=True, text=True, timeout=60)
    finally:
        flood.stop()
    # The flood is over: anything still queued has had its chance to run.
    time.sleep(3)
    if call.returncode != 0:
        assert not handoffs.exists(), "the relaunch ran after its caller had given up"
    assert call.returncode == 0, call.stderr            # and it was answered in time
    assert ident in call.stdout and handoffs.read_text() == "systemd\n"
