"""relaunchd's Intel TXT DL handler binary: its header, its parameter block and its
reason codes (formats layer, pure).

The binary is built from daemon/relaunchd/launch/dl_handler/ (C and assembly) and
installed at /usr/lib/relaunchd/txt-dl-handler.bin. Its contract with relaunchd is
launch/dl_handler/abi.h; every offset here mirrors that file, and
tests/unit/launch/test_dl_handler_abi.py checks them against the built binary.

  header (offset 0, 64 bytes): magic "RLDTXTDL", u32 abi_version, header_size,
    entry_offset (the v16 DL_INFO.dl_launch target), image_size (file bytes),
    memory_size (segment bytes: image + zeroed bss), params_offset, params_size,
    slrt_layout (16), align (4096), 5 reserved words.
  params (200 bytes, at params_offset; DL_INFO.bl_context.context points at it):
    inputs relaunchd fills at stage time, then the handler's report (status, reason,
    detail, step, out_flags), see `Params`.

Reason codes are stable; a reset with `launch.require_drtm` leaves
0xC000C000 | reason in TXT.ERRORCODE when the TXT private space is open
(docs/drtm.md "When a check fails").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from relaunchd.errors import InvalidDlHandler

MAGIC = b"RLDTXTDL"
ABI_VERSION = 1
HEADER_SIZE = 64
SLRT_LAYOUT = 16
ALIGN = 4096
PARAMS_MAGIC = int.from_bytes(b"RLDLPARM", "little")
PARAMS_VERSION = 1
PARAMS_SIZE = 200
MAX_IMAGE = 1 << 20                  # the handler is a few KiB; refuse anything silly

FLAG_REQUIRE_DRTM = 1 << 0

STATUS_NOT_RUN = 0
STATUS_LAUNCHING = 1
STATUS_RETURNED = 2
STATUS_RESETTING = 3

OUT_INTEL_INFO_CHANGED = 1 << 0
OUT_BIOS_SINIT = 1 << 1

ERRORCODE_BASE = 0xC000C000
ERRORCODE_MASK = 0xFFFFF000

# abi.h RLD_REASON_*: number -> (name, what failed)
REASONS: dict[int, tuple[str, str]] = {
    1: ("BAD_CONTEXT", "the SLRT, DL_INFO or parameter block the handler was called with "
                       "is not the one relaunchd staged"),
    2: ("NOT_BSP", "not running on the bootstrap processor"),
    3: ("NO_SMX", "the CPU has no SMX (CPUID.1:ECX[6])"),
    4: ("FEATURE_CONTROL", "IA32_FEATURE_CONTROL is not locked with SENTER enabled"),
    5: ("TXT_RESET_PENDING", "TXT.ESTS.TXT_RESET is set: a power cycle is needed"),
    6: ("TXT_ERROR", "TXT.ERRORCODE reports an error from an earlier launch"),
    7: ("SENTER_DONE", "TXT.STS.SENTER.DONE: a measured launch is still active (no SEXIT)"),
    8: ("HEAP_INVALID", "the TXT heap base/size or the BiosData size is not sane"),
    9: ("BIOS_DATA_VERSION", "BiosData is older than version 5"),
    10: ("CPU_COUNT", "BiosData num_logical_procs is 0 or above Secure Launch's 512"),
    11: ("HEAP_TOO_SMALL", "the TXT heap has no room for OsMleData, OsSinitData and "
                           "SinitMleData"),
    12: ("GETSEC_CAPABILITIES", "GETSEC[CAPABILITIES] lacks chipset, SENTER or PARAMETERS"),
    13: ("MLE_HEADER", "the kernel's MLE header is missing or not a v16 one"),
    14: ("MLE_CAPABILITIES", "the kernel's MLE header lacks a capability relaunchd requests"),
    15: ("MLE_LOCATION", "the MLE, its page tables or a buffer are not where the launch "
                         "needs them"),
    16: ("PTAB_TOO_SMALL", "the MLE page-table area is too small for the MLE"),
    17: ("BEYOND_PMR", "a buffer lies outside the low DMA-protected range"),
    18: ("NO_SINIT", "no usable SINIT ACM (neither relaunchd's nor the BIOS copy)"),
    19: ("SINIT_TOO_LARGE", "the SINIT ACM does not fit TXT.SINIT.SIZE or the CPU's "
                            "maximum ACM size"),
    20: ("MTRR_COUNT", "too many variable MTRRs for INTEL_INFO, or too few for the ACM"),
    21: ("MACHINE_CHECK", "a machine check is in progress or a bank cannot be cleared"),
    22: ("TPM_NOT_TIS", "no TPM on the TIS interface at 0xFED40000"),
    23: ("TPM_LOCALITY", "a TPM locality stays active"),
    24: ("APIC", "the local APIC is disabled or the INIT IPI was not delivered"),
    25: ("EXCEPTION", "a CPU exception while the handler ran"),
    26: ("SINIT_CAPABILITIES", "the SINIT ACM in use lacks a capability relaunchd requests"),
}

_HEADER = struct.Struct("<8s9I20x")
# abi.h struct rld_dl_params, field by field.
_PARAMS = struct.Struct("<QIIII" + "Q" * 18 + "IIIIQII")


@dataclass(frozen=True)
class Header:
    abi_version: int
    header_size: int
    entry_offset: int
    image_size: int
    memory_size: int
    params_offset: int
    params_size: int
    slrt_layout: int
    align: int


@dataclass(frozen=True)
class Params:
    """abi.h struct rld_dl_params. Addresses are physical; all below 4 GiB."""

    flags: int = 0
    os_sinit_caps: int = 0
    slrt: int = 0
    dl_info: int = 0
    intel_info: int = 0
    sinit: int = 0
    sinit_size: int = 0
    kernel_base: int = 0
    kernel_size: int = 0
    mle_ptab: int = 0
    mle_ptab_size: int = 0
    ap_wake_block: int = 0
    ap_wake_block_size: int = 0
    event_log: int = 0
    event_log_size: int = 0
    pmr_lo_base: int = 0
    pmr_lo_size: int = 0
    pmr_hi_base: int = 0
    pmr_hi_size: int = 0
    rsdp: int = 0
    os_sinit_flags: int = 0
    min_mle_version: int = 0
    # written by the handler
    status: int = STATUS_NOT_RUN
    reason: int = 0
    detail: int = 0
    step: int = 0
    out_flags: int = 0


@dataclass(frozen=True)
class HandlerImage:
    """A validated handler binary."""

    data: bytes
    header: Header

    def with_params(self, params: Params) -> bytes:
        """The image as staged: the parameter block filled in."""
        out = bytearray(self.data)
        out[self.header.params_offset:self.header.params_offset + PARAMS_SIZE] = \
            pack_params(params)
        return bytes(out)


def parse(data: bytes) -> HandlerImage:
    """Check the header and the empty parameter block; raises InvalidDlHandler."""
    if len(data) < HEADER_SIZE:
        raise InvalidDlHandler(f"{len(data)} bytes is too short for a DL handler header")
    if len(data) > MAX_IMAGE:
        raise InvalidDlHandler(f"{len(data)} bytes is implausibly large for a DL handler")
    magic, *values = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidDlHandler(f"not relaunchd's TXT DL handler (magic {magic!r})")
    h = Header(*values)
    if h.abi_version != ABI_VERSION:
        raise InvalidDlHandler(f"DL handler ABI version {h.abi_version}, this relaunchd "
                               f"speaks {ABI_VERSION}")
    if h.header_size != HEADER_SIZE or h.image_size != len(data):
        raise InvalidDlHandler(f"DL handler header says {h.header_size}/{h.image_size} "
                               f"bytes, the file has {len(data)}")
    if h.slrt_layout != SLRT_LAYOUT:
        raise InvalidDlHandler(f"DL handler built for SLRT layout v{h.slrt_layout}, "
                               f"relaunchd builds v{SLRT_LAYOUT}")
    if h.align != ALIGN or h.memory_size % ALIGN or h.memory_size < h.image_size:
        raise InvalidDlHandler(f"DL handler memory size {h.memory_size:#x} / alignment "
                               f"{h.align:#x} are not usable")
    if not HEADER_SIZE <= h.entry_offset < h.image_size:
        raise InvalidDlHandler(f"DL handler entry {h.entry_offset:#x} is outside its image")
    if (h.params_size != PARAMS_SIZE or h.params_offset % 8
            or not HEADER_SIZE <= h.params_offset <= h.image_size - PARAMS_SIZE):
        raise InvalidDlHandler(f"DL handler parameter block at {h.params_offset:#x} "
                               f"({h.params_size} bytes) is not usable")
    magic_p, version, size = struct.unpack_from("<QII", data, h.params_offset)
    if (magic_p, version, size) != (PARAMS_MAGIC, PARAMS_VERSION, PARAMS_SIZE):
        raise InvalidDlHandler("DL handler parameter block has no valid magic/version")
    return HandlerImage(bytes(data), h)


def pack_params(p: Params) -> bytes:
    values = [getattr(p, f.name) for f in fields(Params)]
    try:
        return _PARAMS.pack(PARAMS_MAGIC, PARAMS_VERSION, PARAMS_SIZE, *values)
    except struct.error as e:
        raise InvalidDlHandler(f"DL handler parameter out of range ({e})") from None


def unpack_params(raw: bytes) -> Params:
    """The parameter block as found in memory (e.g. after the handler ran)."""
    magic, version, size, *values = _PARAMS.unpack_from(raw)
    if (magic, version, size) != (PARAMS_MAGIC, PARAMS_VERSION, PARAMS_SIZE):
        raise InvalidDlHandler("not a DL handler parameter block")
    return Params(*values)


@dataclass(frozen=True)
class Reason:
    code: int
    name: str
    text: str

    @property
    def id(self) -> str:
        """The reason as relaunchd names it elsewhere: dl-handler-<name>."""
        return "dl-handler-" + self.name.lower().replace("_", "-")


def reason(code: int) -> Reason:
    name, text = REASONS.get(code, (f"UNKNOWN_{code:#x}", f"unknown reason {code:#x}"))
    return Reason(code, name, text)


def reason_from_errorcode(value: int | None) -> Reason | None:
    """The handler's reason when TXT.ERRORCODE holds one of its reset codes."""
    if value is None or value & ERRORCODE_MASK != ERRORCODE_BASE:
        return None
    return reason(value & ~ERRORCODE_MASK)
