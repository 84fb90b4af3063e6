"""(Named to run first: its own guest is gone before the shared one boots.)
A measured UEFI boot: OVMF → systemd-boot → a UKI of the guest's own kernel
and initrd. Debian's systemd-stub measures the UKI into PCR 11 of the swtpm
TPM; relaunchd's prediction (`relaunchctl inspect`, run inside the guest on the
same UKI) must reproduce the real value."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from .image import make_data_disk
from .machine import Machine, MachineSpec
from .uefi import extend, guest_uki, make_esp

BOOT_TIMEOUT = 900  # OVMF under TCG adds ~20 s to a boot
STUB_VAR = "/sys/firmware/efi/efivars/StubPcrKernelImage-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
PCR11 = """python3 - <<'PY'
from tpm2_pytss import ESAPI
with ESAPI("device:/dev/tpmrm0") as esapi:
    print(bytes(esapi.pcr_read("sha256:11")[2][0]).hex())
PY"""


@pytest.fixture(scope="module")
def uefi_guest(vm_image, relaunchd_deb, tmp_path_factory, vm_timings) -> Iterator[Machine]:
    work = tmp_path_factory.mktemp("vm-uefi")
    uki = guest_uki(vm_image, work / "guest.efi")
    esp = make_esp(uki, work / "esp")
    data = make_data_disk({"relaunchd.deb": relaunchd_deb, "guest.efi": uki}, work / "data.img")
    with Machine(MachineSpec(vm_image, data_disk=data, esp=esp)) as machine:
        boot = machine.boot(timeout=BOOT_TIMEOUT)
        vm_timings.add("uefi_boot_to_ready", boot.seconds)
        yield machine
        machine.poweroff()


def test_booted_through_systemd_stub(uefi_guest):
    assert uefi_guest.run("test -d /sys/firmware/efi").ok
    assert uefi_guest.run(f"test -e {STUB_VAR}").ok, "systemd-stub did not report a measurement"


def test_pcr11_matches_relaunchd_prediction(uefi_guest):
    out = json.loads(uefi_guest.run("relaunchctl inspect --json /srv/rld/guest.efi").output)
    info = out[0] if isinstance(out, list) else out
    predicted = info["pcr11"]["sha256"]  # the stub's measurement of the sections
    # The guest's initrd is initramfs-tools (no systemd in it), so after the stub
    # only the booted system's systemd-pcrphase extends PCR 11: sysinit, ready.
    phases = [phase for phase, unit in (("sysinit", "systemd-pcrphase-sysinit"),
                                        ("ready", "systemd-pcrphase"))
              if uefi_guest.run(f"systemctl is-active {unit}", check=False).ok]
    assert phases == ["sysinit", "ready"], "systemd-pcrphase did not run as expected"
    expected = predicted
    for phase in phases:
        expected = extend(expected, phase)
    assert uefi_guest.run(PCR11).output.strip() == expected


def _timespan_usec(text: str) -> int:
    """systemd's format_timespan() as systemd-analyze prints it ("1min 2.345s", "567ms")."""
    units = {"min": 60_000_000, "s": 1_000_000, "ms": 1000, "us": 1}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(min|ms|us|s)\b", text):
        total += float(number) * units[unit]
    return round(total)


def test_firmware_time_comes_from_the_boot_loader_variables(uefi_guest):
    """What a relaunch saves: OVMF + systemd-boot's time on this (cold) boot, read by
    relaunchd from systemd-boot's LoaderTime*USec variables and checked against
    systemd's own reading of them (`systemd-analyze time`: firmware, loader)."""
    saved = json.loads(uefi_guest.run("relaunchctl check --json", check=False).output)[
        "firmware_time"]
    assert saved["source"] == "systemd-boot", saved
    assert saved["firmware_usec"] > 0 and saved["loader_usec"] > 0
    assert saved["avoided_usec"] == saved["firmware_usec"] + saved["loader_usec"]
    analyze = uefi_guest.run("systemd-analyze time").output
    found = re.search(r"in (.+?) \(firmware\) \+ (.+?) \(loader\)", analyze)
    assert found, analyze
    # format_timespan rounds to milliseconds here.
    assert abs(_timespan_usec(found.group(1)) - saved["firmware_usec"]) <= 1000, analyze
    assert abs(_timespan_usec(found.group(2)) - saved["loader_usec"]) <= 1000, analyze
    human = uefi_guest.run("relaunchctl check", check=False).output
    assert "Firmware time a relaunch avoids:" in human and "from systemd-boot" in human
