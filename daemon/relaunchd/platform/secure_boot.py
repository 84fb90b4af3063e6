"""Secure Boot and kernel lockdown state, from efivarfs and securityfs (platform layer).

Kept apart from `readiness` so that staging, which needs only these two facts, does
not import the whole readiness probe (TXT, ACM, TPM decoders) on its way to a
kexec load.
"""

from __future__ import annotations

import re

from relaunchd.platform.sysroot import Read, SysRoot

# EFI_GLOBAL_VARIABLE (UEFI 2.10 §3.3):
# {0x8BE4DF61,0x93CA,0x11D2,{0xAA,0x0D,0x00,0xE0,0x98,0x03,0x2B,0x8C}}
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def read_efi_bool(root: SysRoot, var: str) -> Read:
    """A one-byte boolean UEFI global variable (SecureBoot, SetupMode) from efivarfs."""
    raw = root.read_bytes(f"/sys/firmware/efi/efivars/{var}-{EFI_GLOBAL}", limit=64)
    if not raw.ok or raw.value is None:
        return Read(raw.path, error=raw.error, detail=raw.detail)
    if len(raw.value) != 5:   # u32 attributes + one u8 (UEFI 2.10 §3.3, efivarfs)
        return Read(raw.path, error="garbage", detail=f"{len(raw.value)} bytes")
    return Read(raw.path, raw.value[4] == 1)


def read_lockdown(root: SysRoot) -> Read:
    """The active lockdown mode from securityfs ("none [integrity] confidentiality"
    → "integrity"). A failed read is returned as it is (the caller may fall back
    to the kernel config); an unparseable line is an error "garbage"."""
    line = root.read_line("/sys/kernel/security/lockdown")
    if not line.ok or line.value is None:
        return line
    m = re.search(r"\[(\w+)\]", line.value)
    return (Read(line.path, m.group(1)) if m else
            Read(line.path, error="garbage", detail=line.value[:60]))
