"""FakeMachine held to HostMachine where the real one needs real inputs: the digests of a
real staged UKI (Debian's signed kernel, staged by the real `staging.prepare` under a
platform fixture root) and the TPM steps against a software TPM (swtpm). The same
assertions (tests/support/machine_contract.py) run against both; the unit-tier part of
the contract is tests/unit/engine/test_machine_contract.py.

The firmware time from the kernel's FPDT record, on both (test_firmware_time_from_the_fpdt).

The fake is not a TPM model: that the TPM's PCR holds what the log replays to is checked
for the real machine only (test_the_real_measurement_replays_to_the_extended_pcr).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.engine.config import Config, TrustConfig
from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.stage_request import StageRequest, stage_options
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot
from support import machine_contract as contract
from support.fakes import FakeMachine, FakeStaged
from support.swtpm import running_swtpm
from support.tools import require

PCR = 23
BANKS = ("sha256", "sha1")


def _memfd_bytes(fd: int, size: int) -> bytes:
    return os.pread(fd, size, 0)


@pytest.fixture
def host(tmp_path) -> HostMachine:
    root = materialize("intel-laptop-ptt", tmp_path / "platform")
    return HostMachine(SysRoot(str(root)), ProbeConfig(root=str(root)))


def test_digests_of_a_real_staged_image(host, tmp_path, real_ukis, keys, debian_kernel):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    image = images / "signed.efi"
    image.write_bytes(real_ukis["signed"].read_bytes())
    config = Config(root=host.root.root, image_dirs=(str(images),),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),)))
    options = stage_options(config, StageRequest(str(image)), best_method="kexec")
    staged = host.prepare(str(image), options)
    try:
        digests = host.digests(staged, BANKS)
        contract.assert_digests(digests, BANKS, initrd=staged.initrd is not None)
        assert staged.initrd is not None
        # Independently: the kernel is Debian's vmlinuz as shipped, the initrd and the
        # command line are what the sealed memfds and the staged text hold.
        kernel = debian_kernel.vmlinuz.read_bytes()
        initrd = _memfd_bytes(staged.initrd.fd, staged.initrd.size)
        cmdline = staged.cmdline.text.encode()
        for bank in BANKS:
            assert digests["kernel"][bank] == hashlib.new(bank, kernel).hexdigest()
            assert digests["initrd"][bank] == hashlib.new(bank, initrd).hexdigest()
            assert digests["cmdline"][bank] == hashlib.new(bank, cmdline).hexdigest()
        assert cmdline.endswith(f"relaunchd.id={options.relaunch_id}".encode())
    finally:
        staged.close()


@pytest.mark.parametrize("initrd", [True, False], ids=["initrd", "no-initrd"])
def test_digests_of_the_fake_staged_image(initrd):
    staged = FakeStaged("r-1", "/boot/x.efi", "kexec", "file")
    if not initrd:
        staged.initrd = None
    contract.assert_digests(FakeMachine().digests(staged, BANKS), BANKS, initrd=initrd)


# ------------------------------------------------------------------ firmware time

# The kernel's FPDT boot record (drivers/acpi/acpi_fpdt.c: one decimal per file, ns).
FPDT = {"firmware_start_ns": "0", "bootloader_load_ns": "4100000000",
        "bootloader_launch_ns": "4200000000", "exitbootservice_start_ns": "6900000000",
        "exitbootservice_end_ns": "7000000000"}
FPDT_TIME = {"source": "acpi-fpdt", "firmware_usec": 4200000, "loader_usec": 2800000,
             "avoided_usec": 7000000, "reason": None}


@pytest.mark.parametrize("kind", ["fake", "host"])
def test_firmware_time_from_the_fpdt(kind, host):
    """The laptop fixture with the kernel's FPDT directory: what the proof copies into
    LastRelaunch, the same shape from both (the unit tier covers systemd-boot's variables
    and an unreadable source)."""
    if kind == "fake":
        machine = FakeMachine()
        machine.cold_boot = FirmwareTime("acpi-fpdt", firmware_usec=4200000,
                                         loader_usec=2800000)
    else:
        boot = Path(host.root.root, "sys/firmware/acpi/fpdt/boot")
        boot.mkdir(parents=True)
        for name, value in FPDT.items():
            (boot / name).write_text(value + "\n")
        machine = host
    value = machine.firmware_time()
    contract.assert_firmware_time(value)
    assert value == FPDT_TIME


# ------------------------------------------------------------------ with a TPM

@pytest.fixture
def tpm():
    require("swtpm", "tpm2_pcrreset")
    with running_swtpm() as sw:
        subprocess.run(["tpm2_pcrreset", "-T", sw.tcti, str(PCR)], check=True, timeout=10)
        yield sw


@pytest.fixture(params=["fake", "host"])
def machine_and_tcti(request, tpm, host):
    if request.param == "fake":
        return FakeMachine(), tpm.tcti
    return host, tpm.tcti


def items() -> list[tuple[str, dict[str, bytes]]]:
    blobs = {"kernel": b"MZ kernel" * 64, "initrd": b"070701" * 64, "cmdline": b"quiet"}
    return [(label, {b: hashlib.new(b, blob).digest() for b in BANKS})
            for label, blob in blobs.items()]


def test_nothing_measured_yet(machine_and_tcti, tmp_path):
    machine, tcti = machine_and_tcti
    log = str(tmp_path / "measurements.log")
    assert machine.recover_log(log, tcti, PCR, BANKS) == 0
    result = machine.replay_log(log, tcti, PCR, BANKS)
    contract.assert_replay(result, BANKS)
    assert result.ok                  # a missing log replays to the reset PCR
    assert isinstance(machine.tpm_reset_count(tcti), int)


def test_measure_then_replay(machine_and_tcti, tmp_path):
    machine, tcti = machine_and_tcti
    log = str(tmp_path / "measurements.log")
    count = machine.measure(tcti, PCR, BANKS, items(), log, "r-1")
    assert count == machine.tpm_reset_count(tcti)
    result = machine.replay_log(log, tcti, PCR, BANKS)
    contract.assert_replay(result, BANKS)
    assert result.ok
    assert machine.recover_log(log, tcti, PCR, BANKS) == 0     # nothing to cut


def test_the_real_measurement_replays_to_the_extended_pcr(tpm, host, tmp_path):
    log = str(tmp_path / "measurements.log")
    host.measure(tpm.tcti, PCR, BANKS, items(), log, "r-1")
    result = host.replay_log(log, tpm.tcti, PCR, BANKS)
    for bank in BANKS:
        value = bytes(hashlib.new(bank).digest_size)
        for _label, digests in items():
            value = hashlib.new(bank, value + digests[bank]).digest()
        assert result.actual[bank] == result.expected[bank] == value.hex()
