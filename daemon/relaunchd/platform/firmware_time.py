"""The firmware time of the last cold boot, with its source (platform layer).

Reads the kernel's FPDT boot record, then systemd-boot's
LoaderTimeInitUSec/LoaderTimeExecUSec from efivarfs (systemd 252's order), through
the root prefix; the rules and sources are in formats.firmware_time. `relaunchctl
check` shows `last_cold_boot(root)` ("firmware_time" in --json); the engine reads it
through its machine (engine.host_machine `firmware_time`) in the boot that proves a
relaunch, and engine.proof reports what that relaunch avoided in LastRelaunch, the
history and the metrics (docs/fleet.md, "Seconds saved").
"""

from __future__ import annotations

from typing import Any

from relaunchd.errors import InvalidArgument
from relaunchd.formats import firmware_time
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.platform.sysroot import NOT_PRESENT, Read, SysRoot

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = "/sys/firmware/efi/efivars"
LOADER_INIT = f"{EFIVARS}/LoaderTimeInitUSec-{LOADER_GUID}"
LOADER_EXEC = f"{EFIVARS}/LoaderTimeExecUSec-{LOADER_GUID}"
FPDT_BOOT = "/sys/firmware/acpi/fpdt/boot"
VARIABLE_LIMIT = 256           # a decimal in UTF-16 plus attributes: tens of bytes


def last_cold_boot(root: SysRoot) -> FirmwareTime:
    """Firmware and loader time of the cold boot this system descends from."""
    refused: list[str] = []
    fpdt = _from_fpdt(root, refused)
    if fpdt is not None:
        return fpdt
    loader = _from_loader(root, refused)
    if loader is not None:
        return loader
    why = "; ".join(refused) if refused else (
        "no boot loader timestamps (LoaderTime*USec) and no ACPI FPDT boot record")
    return FirmwareTime(firmware_time.UNKNOWN, reason=why)


def _from_loader(root: SysRoot, refused: list[str]) -> FirmwareTime | None:
    values = _both(root.read_bytes(LOADER_INIT, limit=VARIABLE_LIMIT),
                   root.read_bytes(LOADER_EXEC, limit=VARIABLE_LIMIT), refused)
    if values is None:
        return None
    try:
        return firmware_time.from_loader(firmware_time.efi_usec_variable(values[0]),
                                         firmware_time.efi_usec_variable(values[1]))
    except InvalidArgument as exc:
        refused.append(f"systemd-boot variables: {exc}")
        return None


def _from_fpdt(root: SysRoot, refused: list[str]) -> FirmwareTime | None:
    values = _both(root.read_int(f"{FPDT_BOOT}/bootloader_launch_ns", base=10),
                   root.read_int(f"{FPDT_BOOT}/exitbootservice_end_ns", base=10), refused)
    if values is None:
        return None
    try:
        return firmware_time.from_fpdt(*values)
    except InvalidArgument as exc:
        refused.append(f"ACPI FPDT: {exc}")
        return None


def _both(first: Read, second: Read, refused: list[str]) -> tuple[Any, Any] | None:
    """The two values of a source, or None: both absent (no such source, nothing to say),
    or one unreadable (said in `refused`)."""
    if first.error == NOT_PRESENT and second.error == NOT_PRESENT:
        return None
    if not first.ok or not second.ok or first.value is None or second.value is None:
        bad = first if not first.ok else second
        refused.append(f"{bad.path}: {bad.error} ({bad.detail})")
        return None
    return first.value, second.value
