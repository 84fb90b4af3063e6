"""Firmware memory maps for tests, as /sys/firmware/memmap shows them."""

from __future__ import annotations

from pathlib import Path

# A 2 GiB QEMU (pc, SeaBIOS) guest; ends inclusive; directory names deliberately
# out of address order (sysfs numbers are not sorted either).
QEMU_2G = {
    "3": {"start": "0x0", "end": "0x9fbff", "type": "System RAM"},
    "0": {"start": "0x9fc00", "end": "0x9ffff", "type": "Reserved"},
    "10": {"start": "0xf0000", "end": "0xfffff", "type": "Reserved"},
    "1": {"start": "0x100000", "end": "0x7ffdffff", "type": "System RAM"},
    "2": {"start": "0x7ffe0000", "end": "0x7fffffff", "type": "Reserved"},
    "5": {"start": "0xfeffc000", "end": "0xfeffffff", "type": "Reserved"},
    "4": {"start": "0xfffc0000", "end": "0xffffffff", "type": "Reserved"},
}


def write_memmap(root: Path, memmap: dict[str, dict[str, str]]) -> None:
    """Lay the map out under ROOT/sys/firmware/memmap like sysfs does."""
    for name, attrs in memmap.items():
        d = root / "sys/firmware/memmap" / name
        d.mkdir(parents=True, exist_ok=True)
        for key, value in attrs.items():
            (d / key).write_text(value + "\n")
