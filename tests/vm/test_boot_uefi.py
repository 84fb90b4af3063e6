"""(Named to run first: its own guest is gone before the shared one boots.)
A measured UEFI boot: OVMF → systemd-boot → a UKI of the guest's own kernel
and initrd. Debian's systemd-stub measures the UKI into PCR 11 of the swtpm
TPM; relaunchd's prediction (`relaunchctl inspect`, run inside the guest on the
same UKI) must reproduce the real value."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import pytest

from .guestsetup import IMAGES, configure
from .guestuki import guest_uki as relaunch_uki
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
    # No CPUID hypervisor bit: systemd-boot 252 then times the boot (LoaderTime*USec),
    # as on hardware; in a VM it records nothing (src/boot/efi/ticks.c, in_hypervisor).
    spec = MachineSpec(vm_image, data_disk=data, esp=esp, cpu="qemu64,-hypervisor")
    with Machine(spec) as machine:
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


def test_relaunch_keeps_pcrphase_going_and_the_cold_boot_figures(uefi_guest, vm_image, keys,
                                                                 tmp_path, vm_timings):
    """What the sealed-volume prediction assumes of a UKI-booted system, observed: on the
    way down systemd-pcrphase extends PCR 11 with "shutdown" and "final"; the
    StubPcrKernelImage variable survives the kexec, so the relaunched boot runs pcrphase
    again ("sysinit", "ready") although no stub ran; and the firmware time reported after
    the relaunch is still the cold boot's."""
    guest = uefi_guest
    configure(guest, cert=keys["db"].cert, cert_path="/etc/relaunchd/test-db.pem",
              written_by="tests/vm/test_boot_uefi.py")
    marker = f"rld.uefi={uuid.uuid4().hex[:12]}"
    guest.put(f"{IMAGES}/uefi.efi", relaunch_uki(vm_image, keys, tmp_path, marker, "uefi"))
    staged = json.loads(guest.run(f"relaunchctl stage --json {IMAGES}/uefi.efi",
                                  timeout=300).output)
    cold = json.loads(guest.run("relaunchctl check --json", check=False).output)[
        "firmware_time"]
    before = guest.run(PCR11).output.strip()
    result, boot = guest.transition_attached("relaunchctl relaunch --wait", timeout=900)
    vm_timings.add("uefi_relaunch_attached_to_ready", boot.seconds)
    assert result.rc == 0 and result.output == (
        f"relaunch {staged['id']}: the system is going down\n"), result
    assert marker in guest.run("cat /proc/cmdline").output.split()
    assert guest.run(f"test -e {STUB_VAR}").ok, "StubPcrKernelImage did not survive the kexec"
    at_unlock = extend(extend(before, "shutdown"), "final")      # what check predicts
    assert guest.run(PCR11).output.strip() == extend(extend(at_unlock, "sysinit"), "ready")
    after = json.loads(guest.run("relaunchctl check --json", check=False).output)[
        "firmware_time"]
    assert after == cold
    # What this relaunch avoided, as the new boot's proof reports it: the cold boot's.
    last = json.loads(guest.run("relaunchctl status --json").output)["LastRelaunch"]
    assert last["id"] == staged["id"], last
    assert last["firmware_time"]["avoided_usec"] == cold["avoided_usec"], last
    assert last["firmware_time"]["source"] == cold["source"] == "systemd-boot"
