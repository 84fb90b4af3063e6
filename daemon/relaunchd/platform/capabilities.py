"""This process's effective capabilities (platform layer), read from /proc/self/status.

Used to say *why* something the daemon tried was refused — e.g. the quiesce plan's holder
scan naming the capability it lacks — rather than to decide what to try: the kernel's
answer to the attempt is what counts. Numbers from capability(7) / linux/capability.h.
"""

from __future__ import annotations

from collections.abc import Iterable

CAPABILITY_NUMBERS = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19,
                      "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22}
STATUS = "/proc/self/status"


def effective(status_text: str) -> int | None:
    """The CapEff mask in a /proc/PID/status text, or None when it is not there."""
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def missing(names: Iterable[str], status_path: str = STATUS) -> list[str] | None:
    """Which of `names` this process lacks in its effective set; None when unknown."""
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            mask = effective(f.read(65536))
    except OSError:
        return None
    if mask is None:
        return None
    return [n for n in names if not mask >> CAPABILITY_NUMBERS[n] & 1]
