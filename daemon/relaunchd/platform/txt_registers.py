"""Intel TXT public configuration registers: read and decode (platform layer).

Decoding is pure (`from_public_space`, `from_securityfs`, `decode`): bytes or
integers in, named values out. `read_registers` is the only function that
touches the platform, always through a `SysRoot`, and only when the caller
has already established that the CPU has SMX (drtm.md §3.1): on other CPUs
0xFED30000 is not TXT space and /dev/mem must not be opened at all.

Register map and bit meanings: drtm.md §3.2 (Intel TXT Software Development
Guide, Appendix B "TXT Configuration Registers"; tboot config_regs.h).
Secure Launch's own error codes: drtm.md §2.3; relaunchd's DL handler leaves
0xC000C000 | reason when it resets the platform (formats/txt_dl_handler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from relaunchd.formats import txt_dl_handler
from relaunchd.platform.sysroot import GARBAGE, Read, SysRoot

PUB_BASE = 0xFED30000
PUB_READ = 0x8F8             # through E2STS at 0x8F0; the whole space is 64 KiB
SECURITYFS_DIR = "/sys/kernel/security/slaunch/txt"
ERRORCODE_SUCCESS = 0xC0000001
ABSENT_DETAIL = "TXT public space at 0xFED30000 reads as all ones/zeros"

# Offsets in the public space (drtm.md §3.2 table).
OFFSETS = {
    "sts": 0x000,
    "ests": 0x008,
    "errorcode": 0x030,
    "bootstatus": 0x0A0,
    "ver_fsbif": 0x100,
    "didvid": 0x110,
    "ver_emif": 0x200,
    "sinit_base": 0x270,
    "sinit_size": 0x278,
    "heap_base": 0x300,
    "heap_size": 0x308,
    "dpr": 0x330,
    "acm_policy_status": 0x378,   # a.k.a. TXT.SCRATCHPAD, what securityfs calls it
    "e2sts": 0x8F0,
}
# Widths that matter: ESTS is 8 bits and ERRORCODE 32 bits (securityfs prints them so).
_WIDTH_MASK = {"ests": 0xFF, "errorcode": 0xFFFFFFFF, "ver_emif": 0xFFFFFFFF,
               "ver_fsbif": 0xFFFFFFFF}
# securityfs file name -> register (v16 slmodule.c, drtm.md §2.1).
SECURITYFS_FILES = {"sts": "sts", "ests": "ests", "errorcode": "errorcode",
                    "didvid": "didvid", "ver_emif": "ver_emif",
                    "scratchpad": "acm_policy_status", "e2sts": "e2sts"}

# Secure Launch error codes 0xC0008XXX (drtm.md §2.3).
SL_ERRORS = {
    0x001: "GENERIC", 0x002: "TPM_INIT", 0x003: "TPM_INVALID_LOG20",
    0x004: "TPM_LOGGING_FAILED", 0x005: "REGION_STRADDLE_4GB", 0x006: "TPM_EXTEND",
    0x007: "MTRR_INV_VCNT", 0x008: "MTRR_INV_DEF_TYPE", 0x009: "MTRR_INV_BASE",
    0x00A: "MTRR_INV_MASK", 0x00B: "MSR_INV_MISC_EN", 0x00C: "INV_AP_INTERRUPT",
    0x00D: "INTEGER_OVERFLOW", 0x00E: "HEAP_WALK", 0x00F: "HEAP_MAP",
    0x010: "REGION_ABOVE_4GB", 0x011: "HEAP_INVALID_DMAR", 0x012: "HEAP_DMAR_SIZE",
    0x013: "HEAP_DMAR_MAP", 0x014: "HI_PMR_BASE", 0x015: "HI_PMR_SIZE",
    0x016: "LO_PMR_BASE", 0x017: "LO_PMR_MLE", 0x018: "INITRD_TOO_BIG",
    0x019: "HEAP_ZERO_OFFSET", 0x01A: "WAKE_BLOCK_TOO_SMALL", 0x01B: "MLE_BUFFER_OVERLAP",
    0x01C: "BUFFER_BEYOND_PMR", 0x01D: "OS_SINIT_BAD_VERSION", 0x01E: "EVENTLOG_MAP",
    0x01F: "TPM_INVALID_ALGS", 0x020: "TPM_EVENT_COUNT", 0x021: "TPM_INVALID_EVENT",
    0x022: "INVALID_SLRT", 0x023: "SLRT_MISSING_ENTRY", 0x024: "SLRT_MAP",
}
TPM_TYPES = {0: "none", 1: "dTPM 1.2", 2: "dTPM 2.0", 3: "PTT"}


@dataclass(frozen=True)
class TxtRegisters:
    """Raw register values; None where the source does not provide one."""

    sts: int | None = None
    ests: int | None = None
    errorcode: int | None = None
    bootstatus: int | None = None
    ver_fsbif: int | None = None
    didvid: int | None = None
    ver_emif: int | None = None
    sinit_base: int | None = None
    sinit_size: int | None = None
    heap_base: int | None = None
    heap_size: int | None = None
    dpr: int | None = None
    acm_policy_status: int | None = None
    e2sts: int | None = None


@dataclass(frozen=True)
class ErrorCode:
    raw: int
    valid: bool
    success: bool
    text: str


@dataclass(frozen=True)
class DidVid:
    vendor_id: int
    device_id: int
    revision_id: int
    id_ext: int


def from_public_space(buf: bytes) -> TxtRegisters:
    """Registers from a dump of the public space starting at 0xFED30000."""
    if len(buf) < PUB_READ:
        raise ValueError(f"need {PUB_READ} bytes of TXT public space, got {len(buf)}")
    values = {}
    for name, off in OFFSETS.items():
        value = int.from_bytes(buf[off:off + 8], "little")
        values[name] = value & _WIDTH_MASK.get(name, (1 << 64) - 1)
    return TxtRegisters(**values)


def space_is_absent(buf: bytes) -> bool:
    """No TXT chipset answers: the MMIO range reads as all ones (or as nothing at all)."""
    head = buf[:0x120]
    return head == b"\xff" * len(head) or head == b"\x00" * len(head)


def from_securityfs(texts: dict[str, str]) -> TxtRegisters:
    """Registers from v16 securityfs files (`"%#018llx"` etc.); raises ValueError on garbage."""
    values: dict[str, int] = {}
    for fname, reg in SECURITYFS_FILES.items():
        if fname in texts:
            values[reg] = int(texts[fname].strip(), 16)
    return TxtRegisters(**values)


def decode_errorcode(value: int) -> ErrorCode:
    """TXT.ERRORCODE (drtm.md §2.3, §3.2): bit31 valid, bit30 software, bit15 MLE."""
    valid = bool(value & (1 << 31))
    if value == 0:
        return ErrorCode(value, False, False, "no error recorded")
    if value == ERRORCODE_SUCCESS:
        return ErrorCode(value, True, True, "last ACM run succeeded")
    if not valid:
        return ErrorCode(value, False, False, "no valid error (bit 31 clear)")
    if value & 0xFFFFF000 == 0xC0008000:
        code = value & 0xFFF
        name = SL_ERRORS.get(code, "unknown")
        return ErrorCode(value, True, False, f"Secure Launch error 0x{code:03x} {name}")
    handler = txt_dl_handler.reason_from_errorcode(value)
    if handler is not None:
        return ErrorCode(value, True, False, f"relaunchd DL handler reset: {handler.name} "
                         f"({handler.text}) [{handler.id}]")
    if value & (1 << 30):
        source = "MLE" if value & (1 << 15) else "ACM"
        module = {0: "BIOS ACM", 1: "SINIT"}.get(value & 0xF, f"module type {value & 0xF}")
        return ErrorCode(value, True, False,
                         f"{source} error ({module}): class 0x{(value >> 4) & 0x3F:x}, "
                         f"major 0x{(value >> 10) & 0x1F:x}, minor 0x{(value >> 16) & 0xFFF:x}")
    return ErrorCode(value, True, False, f"processor error type 0x{value & 0x7FFF:x}")


def decode_didvid(value: int) -> DidVid:
    return DidVid(value & 0xFFFF, (value >> 16) & 0xFFFF, (value >> 32) & 0xFFFF,
                  (value >> 48) & 0xFFFF)


def decode(regs: TxtRegisters) -> dict[str, Any]:
    """Names and meanings for every register present (JSON-ready)."""
    out: dict[str, Any] = {f.name: f"0x{getattr(regs, f.name):x}"
                           for f in fields(regs) if getattr(regs, f.name) is not None}
    if regs.sts is not None:
        out["senter_done"] = bool(regs.sts & 1)
        out["sexit_done"] = bool(regs.sts & 2)
        out["mem_config_locked"] = bool(regs.sts & (1 << 6))
        out["private_open"] = bool(regs.sts & (1 << 7))
        out["locality2_open"] = bool(regs.sts & (1 << 16))
    if regs.ests is not None:
        out["txt_reset"] = bool(regs.ests & 1)
    if regs.errorcode is not None:
        out["error"] = decode_errorcode(regs.errorcode).text
    if regs.didvid is not None:
        d = decode_didvid(regs.didvid)
        out["chipset"] = {"vendor_id": f"0x{d.vendor_id:04x}", "device_id": f"0x{d.device_id:04x}",
                          "revision_id": f"0x{d.revision_id:x}", "id_ext": f"0x{d.id_ext:x}"}
    if regs.ver_emif is not None:
        out["production_fused"] = bool(regs.ver_emif & (1 << 31))
    if regs.acm_policy_status is not None:
        out["tpm_type"] = TPM_TYPES[(regs.acm_policy_status >> 13) & 3]
    if regs.e2sts is not None:
        out["secrets_in_memory"] = bool(regs.e2sts & 2)
    return out


def read_registers(root: SysRoot) -> Read[TxtRegisters]:
    """Registers from securityfs when this boot was Secure-Launched, else from /dev/mem.

    The caller must only call this when the CPU has SMX (see module docstring).
    """
    if root.is_dir(SECURITYFS_DIR):
        texts: dict[str, str] = {}
        for fname in SECURITYFS_FILES:
            line = root.read_line(f"{SECURITYFS_DIR}/{fname}")
            if line.ok and line.value is not None:
                texts[fname] = line.value
        try:
            regs = from_securityfs(texts)
        except ValueError as exc:
            return Read(SECURITYFS_DIR, error=GARBAGE, detail=str(exc))
        if regs.sts is not None:
            return Read(SECURITYFS_DIR, regs)
    raw = root.read_at("/dev/mem", PUB_BASE, PUB_READ)
    if not raw.ok or raw.value is None:
        return Read(raw.path, error=raw.error, detail=raw.detail)
    if space_is_absent(raw.value):
        return Read(raw.path, error=GARBAGE, detail=ABSENT_DETAIL)
    return Read(raw.path, from_public_space(raw.value))
