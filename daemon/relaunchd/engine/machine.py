"""What the engine asks of the machine (engine layer): the `Machine` protocol.

The engine never touches the kernel, sysfs, the TPM, logind, systemd or image files itself;
every such step goes through one object with these methods. The daemon passes a
`HostMachine` (engine.host_machine) over the real host; unit tests pass the fake in
tests/support/fakes.py, which tests/unit/engine/test_machine_contract.py holds to the same
assertions as the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from relaunchd.launch.assessment import Report
    from relaunchd.launch.staging import StagedImage, StageOptions
    from relaunchd.platform.boot_entries import ListedEntry, Listing
    from relaunchd.platform.image_files import ImagePolicy
    from relaunchd.platform.quiesce import (
        ExecuteReport,
        QuiescePlan,
        QuiescePolicy,
        RehearsalReport,
        RollbackReport,
    )
    from relaunchd.platform.tpm_extend_log import ReplayResult

Progress = Callable[[str, int, int], None]    # (step, done, total)


@dataclass(frozen=True)
class BootFacts:
    """What the new boot looks like, for proving a relaunch (engine.proof.evaluate)."""

    boot_id: str | None
    cmdline: str | None
    kernel_started: float | None    # epoch seconds (psutil.boot_time; whole seconds)
    now: float                      # epoch seconds when the facts were read
    slaunch: bool                   # Secure Launch's securityfs directory exists
    drtm_pcrs: dict[str, Any]       # {"bank", "values", "reset_state"} or {"error": ...}
    drtm_log: bytes | None = None   # securityfs slaunch/eventlog (DRTM methods only)
    drtm_log_error: str | None = None
    # TXT.ERRORCODE after a txt relaunch (None: not read, or no TXT): a launch that reset
    # the machine leaves its reason there (SINIT's, Secure Launch's or relaunchd's DL
    # handler's own reset codes, platform.txt_registers.decode_errorcode).
    txt_errorcode: int | None = None


class Machine(Protocol):
    # ------------------------------------------------------------ images
    def find_images(self, directories: Sequence[str]) -> list[str]:
        """UKI files (`*.efi`, not symlinks) in `directories` and their EFI/Linux, each
        real file once, in directory order."""

    def describe_image(self, path: str, policy: ImagePolicy) -> dict[str, Any]:
        """The catalogue entry of one image: size, mtime, title, uname, signed, profiles;
        `error` instead of what could not be read or where the policy refuses it."""

    def inspect_image(self, path: str, *, profile: int | None, banks: Sequence[str],
                      trusted: list) -> dict[str, Any]:
        """`relaunchctl inspect --json` of one image."""

    def trusted_certificates(self, paths: Sequence[str]) -> list:
        """The certificates in these files (InvalidArgument naming a bad one)."""

    def check_location(self, path: str, policy: ImagePolicy) -> None:
        """InvalidImage unless `path` may be staged under `policy`."""

    # ------------------------------------------------------------ boot loader entries
    def boot_entries(self, *, esp: str | None, xbootldr: str | None,
                     trusted: list | None) -> Listing:
        """The boot loader's entries as systemd-boot would see them, in its order, the
        default and the next boot marked (esp/xbootldr: platform paths; None: found as
        bootctl finds them); with `trusted`, each kernel's signature verdict too (None:
        nothing is hashed)."""

    def prepare_entry(self, listed: ListedEntry, options: StageOptions, *,
                      allow_unsigned_parts: bool,
                      progress: Progress | None = None) -> StagedImage:
        """`prepare` for a listed entry: a Type #2 entry's UKI as any UKI, a Type #1
        entry's kernel, initrds and options (launch.entry_staging)."""

    # ------------------------------------------------------------ kexec image
    def kexec_loaded(self) -> bool | None:
        """/sys/kernel/kexec_loaded: True, False, or None when unreadable."""

    def prepare(self, path: str, options: StageOptions,
                progress: Progress | None = None) -> StagedImage:
        """Copy, verify and build the staged kernel, initrd and command line."""

    def load(self, staged: StagedImage) -> None: ...

    def unload(self) -> None: ...

    def digests(self, staged: StagedImage, banks: Sequence[str]) -> dict[str, dict[str, str]]:
        """{"kernel"|"initrd"|"cmdline": {bank: hex}}: what a measured relaunch extends."""

    # ------------------------------------------------------------ readiness
    def readiness(self) -> Report:
        """Platform facts and every launch method's verdict, read now."""

    def sealed_volumes(self, method: str, tcti: str | None,
                       measurement_pcr: int | None) -> list[dict[str, Any]]:
        """/etc/crypttab's TPM-sealed volumes and whether each unlocks after a relaunch by
        `method` (platform.sealed_volumes.report; a problem reading them is one entry
        with `error`)."""

    def block_inhibitors(self) -> list[dict[str, Any]]:
        """logind `block` inhibitors for shutdown ({what, who, why, mode, uid, pid})."""

    # ------------------------------------------------------------ quiesce
    def quiesce_plan(self, policy: QuiescePolicy) -> QuiescePlan: ...

    def quiesce(self, plan: QuiescePlan, journal: str) -> ExecuteReport: ...

    def rehearse(self, plan: QuiescePlan, journal: str) -> RehearsalReport: ...

    def rollback(self, journal: str) -> RollbackReport: ...

    # ------------------------------------------------------------ measurement
    def measure(self, tcti: str | None, pcr: int, banks: Sequence[str],
                items: Sequence[tuple[str, Mapping[str, bytes]]], log_path: str,
                relaunch_id: str) -> int:
        """Extend and log; the TPM reset counter the log now belongs to."""

    def replay_log(self, log_path: str, tcti: str | None, pcr: int,
                   banks: Sequence[str]) -> ReplayResult: ...

    def tpm_reset_count(self, tcti: str | None) -> int: ...

    def recover_log(self, log_path: str, tcti: str | None, pcr: int,
                    banks: Sequence[str]) -> int:
        """Cut log records that never reached the TPM; how many were cut."""

    # ------------------------------------------------------------ hand-off and new boot
    def handoff(self, kind: str) -> None:
        """"systemd" (kexec.target), "immediate" (reboot(KEXEC) now) or "reboot" (an
        ordinary reboot.target: the fallback when a relaunch cannot happen)."""

    def boot_id(self) -> str | None: ...

    def boot_facts(self, drtm: bool, tcti: str | None) -> BootFacts: ...

    def firmware_time(self) -> dict[str, Any]:
        """What firmware and boot loader took on the cold boot this system descends from
        (platform.firmware_time.last_cold_boot), as `FirmwareTime.to_json()`: `source`
        (systemd-boot | acpi-fpdt | unknown), `firmware_usec`, `loader_usec`,
        `avoided_usec` (their sum; None when unknown) and `reason` (why unknown). Never
        raises: what cannot be read is source "unknown" with the reason. A kexec leaves
        the figures of the original cold boot; a firmware reboot replaces them."""
