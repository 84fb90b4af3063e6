"""The firmware time of the last cold boot, from fixture trees laid out as efivarfs and
the kernel's FPDT directory show them. The variable bytes are written out by hand from
the layout (4 attribute bytes, UTF-16LE digits, NUL), not by relaunchd's own code."""

from __future__ import annotations

from pathlib import Path

from relaunchd.platform import firmware_time
from relaunchd.platform.sysroot import SysRoot

GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# EFI_VARIABLE_BOOTSERVICE_ACCESS | RUNTIME_ACCESS = 0x06, then "1234567" + NUL.
INIT_1234567 = bytes.fromhex("06000000" "3100320033003400350036003700" "0000")
# "4234567"
EXEC_4234567 = bytes.fromhex("06000000" "3400320033003400350036003700" "0000")


def tree(tmp_path: Path, init: bytes | None = None, exe: bytes | None = None,
         fpdt: dict[str, str] | None = None) -> SysRoot:
    efivars = tmp_path / "sys/firmware/efi/efivars"
    efivars.mkdir(parents=True)
    if init is not None:
        (efivars / f"LoaderTimeInitUSec-{GUID}").write_bytes(init)
    if exe is not None:
        (efivars / f"LoaderTimeExecUSec-{GUID}").write_bytes(exe)
    if fpdt is not None:
        boot = tmp_path / "sys/firmware/acpi/fpdt/boot"
        boot.mkdir(parents=True)
        for name, value in fpdt.items():
            (boot / name).write_text(value + "\n")
    return SysRoot(str(tmp_path))


def test_systemd_boot_variables(tmp_path):
    got = firmware_time.last_cold_boot(tree(tmp_path, INIT_1234567, EXEC_4234567))
    assert got.to_json() == {"source": "systemd-boot", "firmware_usec": 1234567,
                             "loader_usec": 3000000, "avoided_usec": 4234567, "reason": None}


def test_fpdt_when_there_are_no_loader_variables(tmp_path):
    got = firmware_time.last_cold_boot(tree(tmp_path, fpdt={
        "firmware_start_ns": "0", "bootloader_load_ns": "5000000000",
        "bootloader_launch_ns": "5855973785", "exitbootservice_start_ns": "14300000000",
        "exitbootservice_end_ns": "14325507185"}))
    assert (got.source, got.firmware_usec, got.loader_usec) == ("acpi-fpdt", 5855973, 8469533)


def test_fpdt_wins_over_loader_variables_as_in_systemd_252(tmp_path):
    got = firmware_time.last_cold_boot(tree(tmp_path, INIT_1234567, EXEC_4234567, fpdt={
        "bootloader_launch_ns": "9000000000", "exitbootservice_end_ns": "9500000000"}))
    assert (got.source, got.firmware_usec, got.loader_usec) == ("acpi-fpdt", 9000000, 500000)


def test_a_refused_fpdt_falls_back_to_the_loader_variables(tmp_path):
    got = firmware_time.last_cold_boot(tree(tmp_path, INIT_1234567, EXEC_4234567, fpdt={
        "bootloader_launch_ns": "9000000000", "exitbootservice_end_ns": "0"}))
    assert got.source == "systemd-boot" and got.firmware_usec == 1234567


def test_bios_boot_is_unknown(tmp_path):
    got = firmware_time.last_cold_boot(SysRoot(str(tmp_path)))
    assert got.source == "unknown" and got.avoided_usec is None
    assert "no boot loader timestamps" in got.reason


def test_non_uefi_fpdt_and_implausible_values_are_refused_with_a_reason(tmp_path):
    got = firmware_time.last_cold_boot(tree(tmp_path, EXEC_4234567, INIT_1234567, fpdt={
        "bootloader_launch_ns": "1", "exitbootservice_end_ns": "0"}))
    assert got.source == "unknown"
    assert "implausible LoaderTimeInitUSec=4234567" in got.reason
    assert "not a UEFI boot" in got.reason
