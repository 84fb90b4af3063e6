"""FakeMachine (tests/support/fakes.py) held to HostMachine (relaunchd.engine.host_machine):
the same assertions (tests/support/machine_contract.py) against both, the real one on a
platform fixture root (tests/fixtures/platforms/intel-txt-server plus a boot id).

What both can honestly do on a development host, and is checked here: readiness (a
verdict per method, the `best` rule, kexec.support), boot id and boot facts (with and
without a DRTM method), the image catalogue (which files, entries, inspect keys, errors),
trust files, the location policy, kexec_loaded, logind inhibitors (one logind answer,
the same rule), the quiesce plan and — on the fixture tree only — quiesce, rehearsal and
rollback, and every TPM step without a TPM (NoTpm).

The firmware time of the last cold boot: unknown on the fixture, systemd-boot's
variables once written into it (the fake: its `cold_boot`), and a read that fails is
unknown with the reason on both.

What this contract cannot cover: the staged image's digests and the TPM steps with a TPM
(tests/integration/test_machine_contract.py: real staging of a real UKI, swtpm); load,
unload and the hand-off on the real machine (host-changing: the VM tier; the hand-off's
systemctl call is in test_host_machine.py); the values a TPM would hold (the fake is not a
TPM model: its replay verdict and reset counter are what a test sets).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.engine.host_machine import HostMachine
from relaunchd.errors import InvalidArgument, InvalidImage, NoTpm
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.platform import quiesce
from relaunchd.platform.image_files import ImagePolicy
from relaunchd.platform.inhibitors import Inhibitor
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot
from support import machine_contract as contract
from support import ukibuild
from support.fakes import FakeMachine, make_report

BOOT_ID = "5e1ec7ed-0000-4000-8000-00000000c0de"
# What logind answers in this world: one lock that blocks a relaunch, two that do not.
LOGIND = [Inhibitor("shutdown:sleep", "apt", "upgrading", "block", 0, 4242),
          Inhibitor("shutdown", "upower", "lid", "delay", 0, 77),
          Inhibitor("sleep", "backup", "copying", "block", 1000, 78)]
# `relaunchctl inspect --json` (docs/relaunchctl.md), Inspect on the bus.
INSPECT_KEYS = {"path", "size", "machine", "profile", "sections", "os_release", "uname",
                "cmdline", "sbat", "profiles", "stub_version", "signature",
                "measured_sections", "not_measured", "pcr11", "pcr11_phases", "pcrsig",
                "warnings"}


class Logind:
    """logind's answer, as bus.logind.LogindInhibitors would give it."""

    def list_inhibitors(self) -> list[Inhibitor]:
        return list(LOGIND)


@pytest.fixture(scope="module")
def small_uki(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("uki")
    return ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b'PRETTY_NAME="Contract Linux"\nID=contract\n'),
        (".uname", b"6.1.0-contract"), (".cmdline", b"quiet"),
        (".linux", b"MZ" + bytes(5000)),
    ]), d / "small.efi").read_bytes()


@pytest.fixture(params=["fake", "host"])
def machine(request, tmp_path):
    if request.param == "fake":
        fake = FakeMachine(report=make_report(ready={"txt", "kexec"}))
        fake.boot = BOOT_ID
        fake.inhibitors = list(LOGIND)
        return fake
    root = materialize("intel-txt-server", tmp_path / "platform")
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
    host = HostMachine(SysRoot(str(root)), ProbeConfig(root=str(root)), Logind())
    assert host.root.root == str(root) != "/"      # nothing below may reach the live root
    return host


def images_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


# ------------------------------------------------------------------ readiness and boot

def test_readiness(machine):
    contract.assert_readiness(machine.readiness())
    assert machine.readiness().best == "txt"        # both worlds: a TXT server


def test_boot_id(machine):
    assert machine.boot_id() == BOOT_ID
    contract.assert_boot_id(machine.boot_id())


@pytest.mark.parametrize("drtm", [False, True], ids=["kexec", "drtm"])
def test_boot_facts(machine, drtm):
    contract.assert_boot_facts(machine.boot_facts(drtm, None), drtm=drtm)


# systemd-boot's variables as efivarfs shows them: 4 attribute bytes (0x06: boot-service
# and runtime access), then the UTF-16LE decimal and its NUL — written from the layout,
# not by relaunchd's code (tests/unit/formats/test_firmware_time.py).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
LOADER_TIMES = {"LoaderTimeInitUSec": "2500000", "LoaderTimeExecUSec": "3750000"}
SYSTEMD_BOOT_TIME = {"source": "systemd-boot", "firmware_usec": 2500000,
                     "loader_usec": 1250000, "avoided_usec": 3750000, "reason": None}


def efi_string_variable(text: str) -> bytes:
    return bytes.fromhex("06000000") + (text + "\0").encode("utf-16-le")


def test_firmware_time_unknown(machine):
    """Neither world has boot loader timestamps or an FPDT (the fixture is a TXT server
    whose efivarfs holds SecureBoot and SetupMode only): unknown, with the reason."""
    value = machine.firmware_time()
    contract.assert_firmware_time(value)
    assert value["source"] == "unknown" and "no boot loader timestamps" in value["reason"]


def test_firmware_time_from_systemd_boot(machine):
    if isinstance(machine, FakeMachine):
        machine.cold_boot = FirmwareTime("systemd-boot", firmware_usec=2500000,
                                         loader_usec=1250000)
    else:
        efivars = Path(machine.root.root, "sys/firmware/efi/efivars")
        for name, usec in LOADER_TIMES.items():
            (efivars / f"{name}-{LOADER_GUID}").write_bytes(efi_string_variable(usec))
    value = machine.firmware_time()
    contract.assert_firmware_time(value)
    assert value == SYSTEMD_BOOT_TIME


def test_firmware_time_that_cannot_be_read_is_unknown_not_an_error(machine):
    if isinstance(machine, FakeMachine):
        machine.fail_firmware_time = OSError("Input/output error")
    else:
        efivars = Path(machine.root.root, "sys/firmware/efi/efivars")
        (efivars / f"LoaderTimeInitUSec-{LOADER_GUID}").mkdir()     # not a readable file
        (efivars / f"LoaderTimeExecUSec-{LOADER_GUID}").write_bytes(
            efi_string_variable("3750000"))
    value = machine.firmware_time()
    contract.assert_firmware_time(value)
    assert value["source"] == "unknown" and value["reason"]


def test_kexec_loaded(machine):
    assert machine.kexec_loaded() is False           # the fixture's kexec_loaded is 0


# ------------------------------------------------------------------ images

def test_find_images(machine, tmp_path):
    a = images_dir(tmp_path)
    for name in ("a.efi", "B.EFI", "notes.txt", "x.efi.bak"):
        (a / name).write_bytes(b"MZ")
    (a / "dir.efi").mkdir()
    (a / "link.efi").symlink_to(a / "a.efi")
    (a / "EFI/Linux").mkdir(parents=True)
    (a / "EFI/Linux/c.efi").write_bytes(b"MZ")
    same = tmp_path / "same"
    same.symlink_to(a)                               # the same files by another name
    found = machine.find_images([str(a), str(same), str(tmp_path / "missing")])
    contract.assert_found_images(found, [str(a / "B.EFI"), str(a / "a.efi"),
                                         str(a / "EFI/Linux/c.efi")])


def test_describe_image(machine, small_uki, tmp_path):
    d = images_dir(tmp_path)
    (d / "good.efi").write_bytes(small_uki)
    (d / "bad.efi").write_bytes(b"MZ" + os.urandom(100))
    policy = ImagePolicy((str(d),))
    good = machine.describe_image(str(d / "good.efi"), policy)
    contract.assert_image_entry(good, str(d / "good.efi"))
    assert (good["title"], good["uname"], good["signed"], good["profiles"]) == (
        "Contract Linux", "6.1.0-contract", False, 0)
    contract.assert_image_entry(machine.describe_image(str(d / "bad.efi"), policy),
                                str(d / "bad.efi"), error="bad.efi")
    elsewhere = ImagePolicy((str(tmp_path / "other"),))
    contract.assert_image_entry(machine.describe_image(str(d / "good.efi"), elsewhere),
                                str(d / "good.efi"), error="not inside an allowed image")
    contract.assert_image_entry(machine.describe_image(str(d / "gone.efi"), policy),
                                str(d / "gone.efi"), error="gone.efi")


def test_inspect_image(machine, small_uki, tmp_path):
    path = tmp_path / "small.efi"
    path.write_bytes(small_uki)
    report = machine.inspect_image(str(path), profile=None, banks=("sha256",), trusted=[])
    assert set(report) == INSPECT_KEYS
    assert report["signature"]["signed"] is False and report["uname"] == "6.1.0-contract"
    with pytest.raises(InvalidImage):
        machine.inspect_image(str(tmp_path / "gone.efi"), profile=None, banks=("sha256",),
                              trusted=[])


def test_trusted_certificates(machine, keys, tmp_path):
    certs = machine.trusted_certificates([str(keys["db"].cert)])
    assert [c.subject.rfc4514_string() for c in certs] == [keys["db"].subject]
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(InvalidArgument, match="bad.pem"):
        machine.trusted_certificates([str(bad)])


def test_check_location(machine, tmp_path):
    d = images_dir(tmp_path)
    (d / "a.efi").write_bytes(b"MZ")
    (d / "link.efi").symlink_to(d / "a.efi")
    policy = ImagePolicy((str(d),))
    assert machine.check_location(str(d / "a.efi"), policy) is None
    outside = tmp_path / "a.efi"
    outside.write_bytes(b"MZ")
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        machine.check_location(str(outside), policy)
    with pytest.raises(InvalidImage, match="symbolic link"):
        machine.check_location(str(d / "link.efi"), policy)
    os.chmod(d, 0o777)                               # anyone could swap the image
    with pytest.raises(InvalidImage, match="writable by non-root"):
        machine.check_location(str(d / "a.efi"), policy)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777


# ------------------------------------------------------------------ relaunch readiness

def test_block_inhibitors(machine):
    contract.assert_inhibitor_entries(machine.block_inhibitors(), ["apt"])


def test_sealed_volumes(machine):
    """A crypttab volume whose device is not there: named, never counted as unlocking."""
    if isinstance(machine, FakeMachine):
        assert machine.sealed_volumes("kexec", None, 23) == []
        machine.volumes = [{"name": "data", "device": "/dev/vdz", "pcrs": [],
                            "unlocks_after_relaunch": False, "stale_pcrs": [],
                            "reason": "cannot open /dev/vdz: No such file or directory",
                            "remedy": "check the device in /etc/crypttab",
                            "error": "No such file or directory"}]
    else:
        assert machine.sealed_volumes("kexec", None, 23) == []     # no /etc/crypttab
        (Path(machine.root.root) / "etc").mkdir(exist_ok=True)
        (Path(machine.root.root) / "etc/crypttab").write_text("data /dev/vdz none luks\n")
    volumes = machine.sealed_volumes("kexec", None, 23)
    contract.assert_volume_entries(volumes, ["data"])
    assert "error" in volumes[0] and "/dev/vdz" in volumes[0]["reason"]


def test_quiesce_plan(machine):
    contract.assert_quiesce_plan(machine.quiesce_plan(quiesce.QuiescePolicy()))


def test_quiesce_rehearse_rollback_on_the_fixture_tree(machine, tmp_path):
    plan = machine.quiesce_plan(quiesce.QuiescePolicy())
    journal = str(tmp_path / "journal.jsonl")
    contract.assert_rehearsal(machine.rehearse(plan, journal))
    nothing = machine.rollback(str(tmp_path / "no-journal.jsonl"))
    assert isinstance(nothing, quiesce.RollbackReport) and nothing.ok
    done = machine.quiesce(plan, journal)
    assert isinstance(done, quiesce.ExecuteReport)
    undone = machine.rollback(journal)
    assert isinstance(undone, quiesce.RollbackReport) and undone.ok


def test_every_tpm_step_without_a_tpm_is_no_tpm(machine, tmp_path):
    if isinstance(machine, FakeMachine):
        machine.tpm = False
    log = str(tmp_path / "measurements.log")
    items = [("kernel", {"sha256": bytes(32)})]
    with pytest.raises(NoTpm):
        machine.measure(None, 23, ("sha256",), items, log, "r-1")
    with pytest.raises(NoTpm):
        machine.replay_log(log, None, 23, ("sha256",))
    with pytest.raises(NoTpm):
        machine.tpm_reset_count(None)
    with pytest.raises(NoTpm):
        machine.recover_log(log, None, 23, ("sha256",))
    assert not os.path.exists(log)
