"""The firmware memory map of the running system, from sysfs (platform layer).

`/sys/firmware/memmap/N/{start,end,type}` (drivers/firmware/memmap.c); the parsing and the
placement rules are pure and live in `formats.x86.memory_ranges`.
"""

from __future__ import annotations

from relaunchd.errors import Unsupported
from relaunchd.formats.x86.memory_ranges import MemoryMap, parse_memmap
from relaunchd.platform.sysroot import SysRoot

MEMMAP_DIR = "/sys/firmware/memmap"


def read_memmap(root: SysRoot) -> MemoryMap:
    """The firmware map of the running system (needs CONFIG_FIRMWARE_MEMMAP)."""
    names = root.listdir(MEMMAP_DIR)
    if not names.ok or not names.value:
        raise Unsupported(f"cannot read {MEMMAP_DIR} ({names.error or 'empty'}): "
                          "the kernel needs CONFIG_FIRMWARE_MEMMAP for the segment loader")
    raw: dict[str, dict[str, str]] = {}
    for name in names.value:
        attrs = {}
        for attr in ("start", "end", "type"):
            line = root.read_line(f"{MEMMAP_DIR}/{name}/{attr}")
            if not line.ok or line.value is None:
                raise Unsupported(f"cannot read {line.path}: {line.error} {line.detail or ''}")
            attrs[attr] = line.value
        raw[name] = attrs
    return parse_memmap(raw)
