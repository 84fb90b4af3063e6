"""Secure Boot and lockdown state (relaunchd.platform.secure_boot) read under a root prefix:
efivarfs variables as the kernel exposes them (4 bytes of attributes, then the value;
Documentation/filesystems/efivarfs.rst) and securityfs's lockdown line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.platform.secure_boot import EFI_GLOBAL, read_efi_bool, read_lockdown
from relaunchd.platform.sysroot import SysRoot

# EFI_GLOBAL_VARIABLE, UEFI 2.10 §3.3 (written out here, not taken from the module)
GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
ATTRS = 0x00000006            # EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS


def efivar(root: Path, name: str, payload: bytes) -> None:
    d = root / "sys/firmware/efi/efivars"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}-{GLOBAL_GUID}").write_bytes(payload)


def test_the_guid_is_efi_global_variable():
    assert EFI_GLOBAL == GLOBAL_GUID


@pytest.mark.parametrize(("value", "expected"), [(1, True), (0, False)])
def test_a_boolean_variable(tmp_path, value, expected):
    efivar(tmp_path, "SecureBoot", struct.pack("<IB", ATTRS, value))
    read = read_efi_bool(SysRoot(str(tmp_path)), "SecureBoot")
    assert read.ok and read.value is expected
    assert read.path == f"/sys/firmware/efi/efivars/SecureBoot-{GLOBAL_GUID}"


@pytest.mark.parametrize("payload", [b"\x06\x00\x00\x00", b"\x06\x00\x00\x00\x01\x00", b""])
def test_a_variable_of_the_wrong_length_is_garbage(tmp_path, payload):
    efivar(tmp_path, "SetupMode", payload)
    read = read_efi_bool(SysRoot(str(tmp_path)), "SetupMode")
    assert not read.ok and read.error == "garbage" and read.value is None


def test_a_missing_variable_says_so(tmp_path):
    read = read_efi_bool(SysRoot(str(tmp_path)), "SecureBoot")
    assert not read.ok and read.error == "not-present"


@pytest.mark.parametrize(("line", "mode"), [
    ("[none] integrity confidentiality\n", "none"),
    ("none [integrity] confidentiality\n", "integrity"),
    ("none integrity [confidentiality]\n", "confidentiality"),
])
def test_the_active_lockdown_mode(tmp_path, line, mode):
    (tmp_path / "sys/kernel/security").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/lockdown").write_text(line)
    read = read_lockdown(SysRoot(str(tmp_path)))
    assert read.ok and read.value == mode


def test_an_unparsable_lockdown_line_is_garbage_and_a_missing_one_passes_through(tmp_path):
    read = read_lockdown(SysRoot(str(tmp_path)))
    assert not read.ok and read.error == "not-present"
    (tmp_path / "sys/kernel/security").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/lockdown").write_text("none integrity\n")
    read = read_lockdown(SysRoot(str(tmp_path)))
    assert not read.ok and read.error == "garbage" and "none integrity" in read.detail


def test_the_platform_fixtures(tmp_path):
    locked = SysRoot(str(materialize("secureboot-lockdown", tmp_path)))
    assert read_lockdown(locked).value == "integrity"
    assert read_efi_bool(locked, "SecureBoot").value is True
    plain = SysRoot(str(materialize("intel-txt-server", tmp_path)))
    assert read_lockdown(plain).value == "none"
