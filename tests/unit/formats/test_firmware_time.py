"""The firmware-time values on their own: efivarfs UTF-16 variables (4 attribute bytes,
UTF-16LE digits, NUL) written out by hand, and systemd 252's plausibility rules for the
loader variables and the FPDT record. The readers over fixture trees:
tests/unit/platform/test_firmware_time.py."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.formats import firmware_time as fmt

INIT_1234567 = bytes.fromhex("06000000" "3100320033003400350036003700" "0000")


def test_a_variable_is_its_decimal_value():
    assert fmt.efi_usec_variable(INIT_1234567) == 1234567


def test_loader_times_split_into_firmware_and_loader():
    got = fmt.from_loader(1_000_000, 3_500_000)
    assert got.to_json() == {"source": "systemd-boot", "firmware_usec": 1_000_000,
                             "loader_usec": 2_500_000, "avoided_usec": 3_500_000,
                             "reason": None}


@pytest.mark.parametrize("init, exe", [(5, 0), (5, 4), (0, fmt.USEC_PER_HOUR + 1)])
def test_implausible_loader_times_are_refused(init, exe):
    with pytest.raises(InvalidArgument, match="implausible LoaderTimeInitUSec"):
        fmt.from_loader(init, exe)


def test_fpdt_nanoseconds_become_microseconds():
    got = fmt.from_fpdt(5_855_973_785, 14_325_507_185)
    assert (got.source, got.firmware_usec, got.loader_usec) == ("acpi-fpdt", 5855973, 8469533)


@pytest.mark.parametrize("launch, end, match", [
    (1, 0, "not a UEFI boot"), (0, 5, "implausible FPDT"), (9, 8, "implausible FPDT"),
    (1, fmt.NSEC_PER_HOUR + 1, "implausible FPDT")])
def test_refused_fpdt_records(launch, end, match):
    with pytest.raises(InvalidArgument, match=match):
        fmt.from_fpdt(launch, end)


def test_unknown_has_no_avoided_time():
    assert fmt.FirmwareTime(fmt.UNKNOWN, reason="x").avoided_usec is None


@pytest.mark.parametrize("raw", [b"", b"\x06\x00\x00\x00", b"\x06\x00\x00\x001\x00x\x00",
                                 b"\x06\x00\x00\x00\xff\xfe\x00", "06000000" "2d003100"])
def test_malformed_variables_are_named_errors(raw):
    raw = bytes.fromhex(raw) if isinstance(raw, str) else raw
    with pytest.raises(InvalidArgument):
        fmt.efi_usec_variable(raw)
