"""A rejected Stage keeps the staged image, over the bus (issue #14, item 10): the real
engine and real verification (tests/support/dbus_fake_machine.py: the kexec load is a
file, FAKE_LOAD_FAILS_FOR makes one image's load fail as the kernel's would).

An update tool has a good image staged; it then stages one signed by an untrusted key
(through `relaunchctl stage`) and one whose load fails (through D-Bus): both are refused,
and the good image stays loaded, recorded and relaunchable, with LastError and the history
saying so."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from relaunchd.bus import client as bus_client
from support.dbus_harness import Daemon, PrivateBus, relaunchctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"


@pytest.fixture(scope="module")
def bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture
def site(tmp_path, real_ukis, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    shutil.copy(real_ukis["signed"], images / "good.efi")
    shutil.copy(real_ukis["signed-other"], images / "untrusted.efi")
    shutil.copy(real_ukis["signed"], images / "broken.efi")
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "vm-no-tpm" / "root", root, symlinks=True)
    for d in ("state", "run"):
        (tmp_path / d).mkdir()
    config = tmp_path / "relaunchd.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(root), "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(images)],
        "trust": {"certificates": [str(keys["db"].cert)]}, "launch": {"method": "kexec"}}))
    return {"config": config, "images": images, "run": tmp_path / "run"}


def wait_for(client, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        props = client.properties()
        if predicate(props):
            return props
        time.sleep(0.05)
    raise AssertionError(f"timed out; last properties: {props}")


def test_rejected_stages_keep_the_staged_image(bus, site):
    d = Daemon(bus, site["config"], engine="fake-machine",
               env={"FAKE_LOAD_FAILS_FOR": "broken"}).start()
    try:
        client = bus_client.Client(address=bus.address)
        r = relaunchctl(bus, "stage", "--json", str(site["images"] / "good.efi"))
        assert r.returncode == 0, r.stderr
        good = json.loads(r.stdout)["id"]

        # 1. verification fails (relaunchctl follows the stage and reports it)
        r = relaunchctl(bus, "stage", str(site["images"] / "untrusted.efi"))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "VerificationFailed" in r.stderr and f"{good} stays staged" in r.stderr
        props = client.properties()
        assert props["State"] == "staged" and props["StagedImage"]["id"] == good
        assert props["CanRelaunch"] == "yes"
        assert props["LastError"]["name"] == "VerificationFailed"
        assert props["LastError"]["kept"] == good and props["LastError"]["id"] != good
        assert (site["run"] / "fake-kexec-loaded").read_text() == "1"
        assert json.loads((site["run"] / "staged.json").read_text())["id"] == good

        # 2. the load fails (an update tool on D-Bus, following State and LastError)
        broken = client.call("Stage", str(site["images"] / "broken.efi"))
        props = wait_for(client, lambda p: p["LastError"].get("id") == broken)
        assert props["State"] == "staged" and props["StagedImage"]["id"] == good
        assert props["LastError"]["name"] == "KexecFailed"
        assert props["LastError"]["kept"] == good
        assert json.loads((site["run"] / "quiesce-plan.json").read_text())["id"] == good

        history = json.loads(relaunchctl(bus, "history", "--json").stdout)
        assert [(h["event"], h["detail"].get("kept")) for h in history[:3]] == [
            ("stage-failed", good), ("stage-failed", good), ("staged", None)]
        assert history[0]["id"] == broken and history[2]["id"] == good

        # the kept image is the one a relaunch uses
        r = relaunchctl(bus, "relaunch", "--wait", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == good
    finally:
        d.stop()
