"""Named errors shared by every layer.

Each error carries the short name that the CLI prints (`InvalidImage: <why>`)
and that the D-Bus adapter maps to `org.relaunchd.Relaunch1.Error.<name>`.
"""

from __future__ import annotations


class RelaunchError(Exception):
    """Base of all errors relaunchd reports to a user; never shown as a traceback."""

    name = "Failed"

    def __str__(self) -> str:
        return super().__str__() or self.name


class InvalidImage(RelaunchError):
    """The file is not a UKI relaunchd can use (not a PE, malformed, wrong type of file)."""

    name = "InvalidImage"


class VerificationFailed(RelaunchError):
    """A signature or digest did not verify against the configured trust."""

    name = "VerificationFailed"


class InvalidArgument(RelaunchError):
    """A request that is well-formed but names something that does not exist (e.g. profile 7)."""

    name = "InvalidArgument"


class Unsupported(RelaunchError):
    name = "Unsupported"


class NotReady(RelaunchError):
    name = "NotReady"


class NotStaged(RelaunchError):
    name = "NotStaged"


class Busy(RelaunchError):
    name = "Busy"


class KexecFailed(RelaunchError):
    name = "KexecFailed"


class InvalidKernel(RelaunchError):
    """A kernel image the x86 segment loader cannot boot (setup header, protocol, layout)."""

    name = "InvalidKernel"


class InvalidTable(RelaunchError):
    """A Secure Launch Resource Table (SLRT) that is malformed or cannot be represented."""

    name = "InvalidTable"


class NoRoom(RelaunchError):
    """A kexec segment does not fit in free RAM under its constraints."""

    name = "NoRoom"


class ConfigError(RelaunchError):
    """The configuration file is unusable; the message names the file, line and key path."""

    name = "InvalidConfig"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None, column: int | None = None) -> None:
        where = ", ".join(part for part in (
            file, f"line {line}" if line is not None else None,
            f"column {column}" if column is not None else None) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.key, self.line, self.column = file, key, line, column


class InvalidEventLog(RelaunchError):
    """A TCG measurement log that is truncated, malformed or inconsistent with its header."""

    name = "InvalidEventLog"


class QuiesceFailed(RelaunchError):
    """A quiesce step (CPU offline, driver unbind) failed; what was done has been rolled back."""

    name = "QuiesceFailed"


class NoTpm(NotReady):
    """There is no usable TPM (no device, no tpm2-pytss): a relaunch may go on unmeasured
    when `measurement.require_tpm` is off."""

    name = "NoTpm"


class TpmFailed(NotReady):
    """A TPM is there but refused a command: never ignored, whatever the configuration."""

    name = "TpmFailed"


class Inhibited(RelaunchError):
    """A logind block inhibitor for shutdown is held; `force` overrides it."""

    name = "Inhibited"


class NoBootEntry(RelaunchError):
    """No boot loader entry fits: none found, or none has the requested id."""

    name = "NoBootEntry"


class InvalidBootEntry(RelaunchError):
    """A boot loader entry relaunchd cannot stage (malformed, not a Linux kernel, a file
    missing, not verified); the message names every reason."""

    name = "InvalidBootEntry"


class RelaunchAborted(RelaunchError):
    """A relaunch ended before the hand-off (refused, interrupted, or the daemon was killed)."""

    name = "RelaunchAborted"


class InvalidDlHandler(RelaunchError):
    """A DL handler binary whose header or parameter block relaunchd cannot use."""

    name = "InvalidDlHandler"


class NoDaemon(RelaunchError):
    """relaunchd is not on the bus (not running, not activatable, or no bus at all)."""

    name = "NoDaemon"


class AccessDenied(RelaunchError):
    """The caller is not authorized (polkit, or the bus policy) for what it asked."""

    name = "AccessDenied"


class Interrupted(RelaunchError):
    """A client was told to stop (SIGTERM, SIGHUP) while the system was not going down."""

    name = "Interrupted"


class InvalidVolume(RelaunchError):
    """An encrypted volume's metadata (LUKS2 header, token, /etc/crypttab line) that is
    malformed or not what its format says."""

    name = "InvalidVolume"


def all_errors() -> list[type[RelaunchError]]:
    """RelaunchError and every error class of this module below it."""
    found, todo = [], [RelaunchError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == __name__]


def error_named(name: str) -> type[RelaunchError] | None:
    """The error class whose `name` is `name` (a D-Bus reply or a LastError), if any."""
    return next((cls for cls in all_errors() if cls.name == name), None)
