"""The launch methods by name, strongest first (launch layer): the one place that lists them.
Configuration, CLI choices, the engine and the proof ask here instead of keeping their own
copies of the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relaunchd.errors import InvalidArgument
from relaunchd.launch.names import DRTM_NAMES, NAMES, is_drtm

if TYPE_CHECKING:
    from relaunchd.launch.protocol import LaunchMethod

__all__ = ["DRTM_NAMES", "NAMES", "is_drtm", "method", "methods"]



def method(name: str) -> LaunchMethod:
    """The method called `name`. Each module is imported when first asked for: the txt and
    skinit modules pull the ACM, TXT and SLRT decoders (~40 ms measured with -X importtime),
    which staging a plain kexec never needs."""
    if name == "kexec":
        from relaunchd.launch.kexec import KexecMethod
        return KexecMethod()
    if name == "txt":
        from relaunchd.launch.txt import TxtMethod
        return TxtMethod()
    if name == "skinit":
        from relaunchd.launch.skinit import SkinitMethod
        return SkinitMethod()
    raise InvalidArgument(f"unknown launch method {name!r} (one of {', '.join(NAMES)})")


def methods() -> tuple[LaunchMethod, ...]:
    return tuple(method(name) for name in NAMES)
