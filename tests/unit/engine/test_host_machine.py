"""The engine's machine on the real host (relaunchd.engine.host_machine), on platform
fixture roots (tests/fixtures/platforms). Nothing here loads, unloads, hands off or
quiesces on the host: every machine reads (and its writer writes) under a tmp fixture
root, asserted; the systemd hand-off runs a fake systemctl from PATH; the immediate
hand-off (reboot(2)) is never called."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.engine import host_machine
from relaunchd.engine.host_machine import HostMachine
from relaunchd.errors import (
    InvalidArgument,
    RelaunchError,
)
from relaunchd.launch import assessment
from relaunchd.platform.inhibitors import Inhibitor, LogindUnavailable
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import FailAt


def test_real_platform_handoff_runs_systemctl(tmp_path, monkeypatch):
    """The real hand-off queues kexec.target; a fake systemctl on PATH records it."""
    from relaunchd.engine.host_machine import HANDOFF_COMMAND, REBOOT_COMMAND

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
    monkeypatch.delenv("FAIL")
    platform.handoff("reboot")               # the fallback: an ordinary reboot, queued
    assert log.read_text().split() == list(REBOOT_COMMAND[1:])
    assert {"--job-mode=replace-irreversibly", "reboot.target"} <= set(REBOOT_COMMAND)
    with pytest.raises(InvalidArgument):
        platform.handoff("poweroff")


# ------------------------------------------------------------------ reads under a fixture root

@pytest.fixture
def server(tmp_path) -> Path:
    return materialize("intel-txt-server", tmp_path)


def machine_on(root: Path, **kw) -> HostMachine:
    host = HostMachine(SysRoot(str(root)), ProbeConfig(root=str(root)), **kw)
    assert host.root.root == str(root) != "/"
    return host


def test_boot_id(server):
    assert machine_on(server).boot_id() is None                   # not in this fixture
    (server / "proc/sys/kernel/random").mkdir(parents=True)
    (server / "proc/sys/kernel/random/boot_id").write_text("  7c1e-boot  \n")
    assert machine_on(server).boot_id() == "7c1e-boot"


@pytest.mark.parametrize(("content", "expected"), [("1\n", True), ("0\n", False),
                                                   (None, None), ("x\n", False)])
def test_kexec_loaded_as_the_kernel_reports_it(server, content, expected):
    path = server / "sys/kernel/kexec_loaded"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    assert machine_on(server).kexec_loaded() is expected


def test_readiness_is_the_assessment_of_the_configured_probe(server):
    host = machine_on(server)
    report = host.readiness()
    assert report.root == str(server) and report.best == "txt"
    assert report.to_json() == assessment.assess(ProbeConfig(root=str(server))).to_json()


def test_for_config_reads_where_the_configuration_says(server):
    from relaunchd.engine.config import Config, TxtConfig

    config = Config(root=str(server), txt=TxtConfig(sinit_acm_dirs=("/opt/acm",)))
    host = HostMachine.for_config(config)
    assert host.root.root == str(server)
    assert host.probe_config == config.probe_config()
    assert host.readiness().verdicts["txt"].ready is False       # no ACM in /opt/acm


def test_boot_facts_of_a_secure_launch(server):
    security = server / "sys/kernel/security"
    (security / "slaunch").mkdir(parents=True)
    log = os.urandom(300)
    (security / "slaunch/eventlog").write_bytes(log)
    facts = machine_on(server).boot_facts(True, None)
    assert facts.slaunch is True and facts.drtm_log == log and facts.drtm_log_error is None
    assert facts.drtm_pcrs == {"error": "no TPM"}                  # no TCTI to ask
    assert facts.cmdline == (server / "proc/cmdline").read_text().strip()
    unreachable = machine_on(server).boot_facts(True, "swtpm:host=127.0.0.1,port=1")
    assert set(unreachable.drtm_pcrs) == {"error"}
    plain = machine_on(server).boot_facts(False, None)
    assert plain.drtm_log is None and plain.drtm_pcrs == {}


def test_boot_facts_without_secure_launch(server):
    facts = machine_on(server).boot_facts(True, None)
    assert facts.slaunch is False and facts.drtm_log is None
    assert facts.drtm_log_error.startswith("/sys/kernel/security/slaunch/eventlog: ")


# systemd-boot's LoaderTime*USec in efivarfs: attributes 0x00000006 (little-endian), then
# the UTF-16LE decimal and its NUL, written from the layout ("7000123" and "8500123").
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
INIT_7000123 = bytes.fromhex("06000000" "37003000300030003100320033000000")
EXEC_8500123 = bytes.fromhex("06000000" "38003500300030003100320033000000")


def test_firmware_time_of_the_fixture_is_unknown(server):
    """A UEFI fixture with neither systemd-boot's timestamps nor an FPDT record."""
    value = machine_on(server).firmware_time()
    assert value["source"] == "unknown" and value["avoided_usec"] is None
    assert "no boot loader timestamps" in value["reason"]


def test_firmware_time_from_systemd_boot_on_the_fixture(server):
    efivars = server / "sys/firmware/efi/efivars"
    (efivars / f"LoaderTimeInitUSec-{LOADER_GUID}").write_bytes(INIT_7000123)
    (efivars / f"LoaderTimeExecUSec-{LOADER_GUID}").write_bytes(EXEC_8500123)
    assert machine_on(server).firmware_time() == {
        "source": "systemd-boot", "firmware_usec": 7000123, "loader_usec": 1500000,
        "avoided_usec": 8500123, "reason": None}


def test_firmware_time_never_raises(server, monkeypatch):
    def broken(root):
        raise ValueError("efivarfs went away")

    monkeypatch.setattr(host_machine, "last_cold_boot", broken)
    assert machine_on(server).firmware_time() == {
        "source": "unknown", "firmware_usec": None, "loader_usec": None,
        "avoided_usec": None, "reason": "cannot read the firmware time: efivarfs went away"}


class Logind:
    def __init__(self, answer) -> None:
        self.answer = answer

    def list_inhibitors(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_inhibitors_from_logind(server):
    locks = [Inhibitor("shutdown", "apt", "upgrading", "block", 0, 9),
             Inhibitor("shutdown", "gnome", "unsaved", "delay", 1000, 10)]
    assert machine_on(server, inhibitor_source=Logind(locks)).block_inhibitors() == [
        {"what": "shutdown", "who": "apt", "why": "upgrading", "mode": "block", "uid": 0,
         "pid": 9}]
    # No logind to ask, or no system bus: nothing blocks (the engine decides what that means)
    assert machine_on(server).block_inhibitors() == []
    absent = Logind(LogindUnavailable("no system bus"))
    assert machine_on(server, inhibitor_source=absent).block_inhibitors() == []
    broken = Logind(RelaunchError("logind answered garbage"))
    with pytest.raises(RelaunchError, match="garbage"):
        machine_on(server, inhibitor_source=broken).block_inhibitors()


@pytest.mark.parametrize(("spec", "expected"), [
    ("", None), ("x", None), ("3", FailAt(nth=3, after=False)),
    ("2:after", FailAt(nth=2, after=True)), ("2:before", FailAt(nth=2, after=False)),
])
def test_fault_injection_for_the_vm_tier(monkeypatch, spec, expected):
    monkeypatch.setenv("RELAUNCHD_TEST_FAIL_STORE", spec)
    assert host_machine._injected_failure() == expected


def test_no_fault_injection_unless_asked(monkeypatch):
    monkeypatch.delenv("RELAUNCHD_TEST_FAIL_STORE", raising=False)
    assert host_machine._injected_failure() is None


def test_the_writer_is_rooted_where_the_machine_reads(server):
    writer = machine_on(server)._writer()
    assert writer.root == str(server)
    writer.write("/sys/devices/system/cpu/cpu2/online", "0")
    assert (server / "sys/devices/system/cpu/cpu2/online").read_text() == "0"


def test_an_unknown_handoff_kind_does_nothing(server):
    with pytest.raises(InvalidArgument, match="unknown hand-off 'poweroff'"):
        machine_on(server).handoff("poweroff")
