"""The firmware time of the last cold boot, with its source (platform layer).

Reads the kernel's FPDT boot record, then systemd-boot's
LoaderTimeInitUSec/LoaderTimeExecUSec from efivarfs (systemd 252's order), through
the root prefix; the rules and sources are
in formats.firmware_time. Integration: LastRelaunch, history, `relaunchctl status`
and the Prometheus counter of seconds saved take `last_cold_boot(root).to_json()`.
"""

from __future__ import annotations

from relaunchd.errors import InvalidArgument
from relaunchd.formats import firmware_time
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.platform.sysroot import NOT_PRESENT, SysRoot

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
    init = root.read_bytes(LOADER_INIT, limit=VARIABLE_LIMIT)
    exe = root.read_bytes(LOADER_EXEC, limit=VARIABLE_LIMIT)
    if init.error == NOT_PRESENT and exe.error == NOT_PRESENT:
        return None
    if not init.ok or not exe.ok or init.value is None or exe.value is None:
        bad = init if not init.ok else exe
        refused.append(f"{bad.path}: {bad.error} ({bad.detail})")
        return None
    try:
        return firmware_time.from_loader(firmware_time.efi_usec_variable(init.value),
                                         firmware_time.efi_usec_variable(exe.value))
    except InvalidArgument as exc:
        refused.append(f"systemd-boot variables: {exc}")
        return None


def _from_fpdt(root: SysRoot, refused: list[str]) -> FirmwareTime | None:
    launch = root.read_int(f"{FPDT_BOOT}/bootloader_launch_ns", base=10)
    end = root.read_int(f"{FPDT_BOOT}/exitbootservice_end_ns", base=10)
    if launch.error == NOT_PRESENT and end.error == NOT_PRESENT:
        return None
    if not launch.ok or not end.ok or launch.value is None or end.value is None:
        bad = launch if not launch.ok else end
        refused.append(f"{bad.path}: {bad.error} ({bad.detail})")
        return None
    try:
        return firmware_time.from_fpdt(launch.value, end.value)
    except InvalidArgument as exc:
        refused.append(f"ACPI FPDT: {exc}")
        return None
