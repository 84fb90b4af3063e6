"""relaunchd's purgatory: four hand-assembled x86_64 instructions (formats layer).

`kexec_load` ends in relocate_kernel (arch/x86/kernel/relocate_kernel_64.S), which copies the
segments into place and jumps to the image's entry in 64-bit mode with identity-mapped page
tables, interrupts off and every general register cleared. A bzImage's 64-bit entry
(`startup_64`, at protected-mode load address + 0x200) expects RSI = physical address of
`struct boot_params` (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"). Jumping to the
kernel directly would leave RSI = 0 and the guest dies silently (kexec-load-notes.md), so
this stub sets RSI and jumps. Nothing else is needed: startup_64 loads its own GDT, reloads
CS, clears the data segment registers and sets up its own stack.

No checksum verification of the segments is done here (kexec-tools' purgatory does SHA-256);
the bytes are checked in userspace before `kexec_load` and the kernel copies them itself.

Encoding (Intel SDM Vol. 2):

    FA                      cli                 optional; relocate_kernel already cleared IF
    48 BE <imm64 LE>        movabs rsi, imm64   REX.W (0x48) + "B8+rd io" with rd = 6 (RSI):
                                                0xB8 + 6 = 0xBE, then 8 immediate bytes
    48 B8 <imm64 LE>        movabs rax, imm64   REX.W + 0xB8 + 0 (RAX), 8 immediate bytes
    FF E0                   jmp rax             "FF /4": ModRM 0xE0 = mod 11 (register),
                                                reg 100 (/4 = JMP near absolute indirect),
                                                rm 000 (RAX)
"""

from __future__ import annotations

import struct

from relaunchd.errors import InvalidArgument
from relaunchd.formats.x86.boot_params import ENTRY_64_OFFSET

CLI = b"\xfa"
MOVABS_RSI = b"\x48\xbe"     # REX.W, B8+6
MOVABS_RAX = b"\x48\xb8"     # REX.W, B8+0
JMP_RAX = b"\xff\xe0"        # FF /4, ModRM 11 100 000


def build_purgatory(zero_page: int, kernel_entry: int, *, cli: bool = True) -> bytes:
    """The purgatory bytes; it is position independent, so any load address works."""
    for name, value in (("zero page", zero_page), ("kernel entry", kernel_entry)):
        if not 0 <= value < 1 << 64:
            raise InvalidArgument(f"{name} address 0x{value:x} is not a 64-bit address")
    return ((CLI if cli else b"")
            + MOVABS_RSI + struct.pack("<Q", zero_page)
            + MOVABS_RAX + struct.pack("<Q", kernel_entry)
            + JMP_RAX)


def kernel_entry(load_address: int) -> int:
    """The 64-bit entry of a bzImage whose protected-mode part sits at `load_address`."""
    return load_address + ENTRY_64_OFFSET
