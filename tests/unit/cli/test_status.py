"""`relaunchctl status`: every property in its order, and for the last relaunch the
firmware time it avoided (LastRelaunch.firmware_time, engine.proof) as a line of its own —
seconds and the source, 0 and why, unknown and why. LastRelaunch as D-Bus delivers it:
a key whose value was null is absent (bus.variants). A scripted client
(tests/support/scripted_client.py) stands in for the bus; the real daemon:
tests/integration/test_bus_service.py."""

from __future__ import annotations

import json

import pytest

from relaunchd.cli import main
from relaunchd.cli import status as status_cmd
from support.scripted_client import ScriptedClient

LAST = {"id": "r-42", "method": "kexec", "verified": True, "downtime_ms": 4321,
        "firmware_time": {"source": "systemd-boot", "firmware_usec": 9120000,
                          "loader_usec": 3225000, "avoided_usec": 12345000}}
PROPS = {"State": "idle", "CanRelaunch": False, "Version": "0.1", "StagedImage": {},
         "LastRelaunch": LAST, "LastError": {}, "Capabilities": {"best": "kexec"}}


@pytest.fixture
def daemon_props(monkeypatch):
    def install(props: dict) -> None:
        monkeypatch.setattr(status_cmd, "connect", lambda: ScriptedClient(props))
    return install


def test_the_last_relaunch_says_what_firmware_time_it_avoided(daemon_props, capsys):
    daemon_props(PROPS)
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("LastRelaunch: ")
    assert lines[at + 1] == "  firmware time avoided: 12.345 s (systemd-boot)"
    assert "  id: r-42" in lines[at + 2:]
    assert "    avoided_usec: 12345000" in lines        # the record itself follows
    assert lines[:3] == ["State:        idle", "CanRelaunch:  False", "Version:      0.1"]
    assert "StagedImage:  -" in lines and "LastError:    -" in lines


@pytest.mark.parametrize(("firmware_time", "shown"), [
    ({"source": "acpi-fpdt", "firmware_usec": 5855973, "loader_usec": 8469533,
      "avoided_usec": 14325506}, "14.326 s (acpi-fpdt)"),
    ({"source": "unknown", "reason": "no boot loader timestamps (LoaderTime*USec) and no "
      "ACPI FPDT boot record"},
     "unknown (no boot loader timestamps (LoaderTime*USec) and no ACPI FPDT boot record)"),
    ({"source": "systemd-boot", "firmware_usec": 9120000, "loader_usec": 3225000,
      "avoided_usec": 0, "reason": "firmware reboot: the fallback"},
     "0 s (firmware reboot: the fallback)"),
    ({"source": "unknown", "avoided_usec": 0, "reason": "firmware reboot: the TPM reset "
      "count went from 7 to 8"}, "0 s (firmware reboot: the TPM reset count went from 7 to 8)"),
    ({"source": "systemd-boot", "avoided_usec": 0}, "0 s (went through firmware)"),
    ({"source": "unknown"}, "unknown (no reason recorded)"),
    ({"avoided_usec": 1500}, "0.002 s (source not recorded)"),
    ({"avoided_usec": -1, "reason": "?"}, "unknown (?)"),
    (None, "unknown (not recorded: concluded by an older relaunchd)"),
])
def test_firmware_time_avoided_rendering(firmware_time, shown):
    last = dict(LAST, firmware_time=firmware_time)
    if firmware_time is None:
        del last["firmware_time"]
    assert status_cmd.firmware_avoided(last) == shown


def test_no_last_relaunch_no_firmware_line(daemon_props, capsys):
    daemon_props(dict(PROPS, LastRelaunch={}))
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "LastRelaunch: -\n" in out and "firmware time avoided" not in out


def test_json_carries_the_last_relaunchs_firmware_time(daemon_props, capsys):
    daemon_props(dict(PROPS, Progress={}))
    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["State", "CanRelaunch", "Version", "Progress", "StagedImage",
                         "LastRelaunch", "LastError", "Capabilities"]
    assert doc["LastRelaunch"]["firmware_time"]["avoided_usec"] == 12345000
