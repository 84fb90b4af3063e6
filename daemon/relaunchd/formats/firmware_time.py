"""How long firmware and boot loader took on the last cold boot (formats layer).

A relaunch skips both, so their time is what each relaunch saves. Two sources,
tried in systemd 252's order (src/shared/boot-timestamps.c, boot_timestamps():
acpi_get_boot_usec first, efi_loader_get_boot_usec second; `systemd-analyze time`
shows the time until the boot loader started as "firmware" and the rest until the
kernel as "loader"):

- ACPI FPDT, the Firmware Basic Boot Performance Record (ACPI 6.5 §5.2.24.7:
  ResetEnd, OsLoaderLoadImageStart, OsLoaderStartImageStart,
  ExitBootServicesEntry, ExitBootServicesExit, ns), as Linux 5.12+ exposes it in
  /sys/firmware/acpi/fpdt/boot/ (drivers/acpi/acpi_fpdt.c: firmware_start_ns,
  bootloader_load_ns, bootloader_launch_ns, exitbootservice_start_ns,
  exitbootservice_end_ns). Firmware time is bootloader_launch_ns, the loader's
  exitbootservice_end_ns − bootloader_launch_ns; exitbootservice_end_ns == 0
  means a non-UEFI boot, and systemd refuses launch == 0, end < launch and
  end > 1 h (src/shared/acpi-fpdt.c).
- systemd-boot's EFI variables LoaderTimeInitUSec (when the boot loader started)
  and LoaderTimeExecUSec (when it started the kernel), microseconds since the
  CPU's reset as the loader's timer counts them. In efivarfs each file is the
  variable's 4 attribute bytes (little-endian) followed by its data, here a
  NUL-terminated UTF-16LE decimal string (systemd src/boot/efi/util.c
  efivar_set_uint64_str / efivar_set). systemd refuses Exec == 0, Exec < Init
  and Exec − Init > 1 h (src/shared/efi-loader.c, efi_loader_get_boot_usec).

Neither (a BIOS boot, a loader that sets no variables, no FPDT): unknown.
The FPDT and the loader's volatile variables are not reset by a kexec, so a
relaunched boot still reports the cold boot it descends from.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaunchd.errors import InvalidArgument

USEC_PER_HOUR = 3600 * 1_000_000
NSEC_PER_HOUR = 3600 * 1_000_000_000
SYSTEMD_BOOT = "systemd-boot"
ACPI_FPDT = "acpi-fpdt"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class FirmwareTime:
    source: str                       # systemd-boot | acpi-fpdt | unknown
    firmware_usec: int | None = None  # reset → boot loader started
    loader_usec: int | None = None    # boot loader started → kernel started
    reason: str | None = None         # why unknown, or what a source was refused for

    @property
    def avoided_usec(self) -> int | None:
        """Firmware plus boot loader: what a relaunch does not go through."""
        if self.firmware_usec is None or self.loader_usec is None:
            return None
        return self.firmware_usec + self.loader_usec

    def to_json(self) -> dict:
        return {"source": self.source, "firmware_usec": self.firmware_usec,
                "loader_usec": self.loader_usec, "avoided_usec": self.avoided_usec,
                "reason": self.reason}


def efi_usec_variable(raw: bytes) -> int:
    """The value of a LoaderTime*USec variable as efivarfs shows it."""
    if len(raw) < 4 + 2 or (len(raw) - 4) % 2:
        raise InvalidArgument("not an efivarfs UTF-16 string variable")
    try:
        text = raw[4:].decode("utf-16-le")
    except UnicodeDecodeError:
        raise InvalidArgument("not UTF-16LE") from None
    text = text.split("\0", 1)[0]
    if not text.isdigit() or not text.isascii():
        raise InvalidArgument(f"not a decimal number: {text[:24]!r}")
    return int(text)


def from_loader(init_usec: int, exec_usec: int) -> FirmwareTime:
    if exec_usec == 0 or exec_usec < init_usec or exec_usec - init_usec > USEC_PER_HOUR:
        raise InvalidArgument(f"implausible LoaderTimeInitUSec={init_usec}, "
                              f"LoaderTimeExecUSec={exec_usec}")
    return FirmwareTime(SYSTEMD_BOOT, firmware_usec=init_usec,
                        loader_usec=exec_usec - init_usec)


def from_fpdt(launch_ns: int, exit_boot_services_end_ns: int) -> FirmwareTime:
    if exit_boot_services_end_ns == 0:
        raise InvalidArgument("FPDT says this was not a UEFI boot (ExitBootServices is 0)")
    if launch_ns == 0 or exit_boot_services_end_ns < launch_ns \
            or exit_boot_services_end_ns > NSEC_PER_HOUR:
        raise InvalidArgument(f"implausible FPDT record: boot loader launched at {launch_ns} ns,"
                              f" ExitBootServices ended at {exit_boot_services_end_ns} ns")
    return FirmwareTime(ACPI_FPDT, firmware_usec=launch_ns // 1000,
                        loader_usec=(exit_boot_services_end_ns - launch_ns) // 1000)
