"""Intel Authenticated Code Module (SINIT ACM) headers (formats layer, pure).

Layout (drtm.md §3.6; Intel TXT Software Development Guide, Appendix A.1
"Authenticated Code Module Format"; the same structures as tboot's acmod.h and
EDK2's IndustryStandard/Acm.h):

  ACM header, little-endian, offsets in bytes:
    0x00 u16 ModuleType (2 = chipset ACM)   0x02 u16 ModuleSubType (0 = TXT, 1 = startup)
    0x04 u32 HeaderLen (dwords)             0x08 u32 HeaderVersion (0 or 3<<16)
    0x0C u16 ChipsetID                      0x0E u16 Flags (bit14 pre-production, bit15 debug)
    0x10 u32 ModuleVendor (0x8086)          0x14 u32 Date (BCD yyyymmdd)
    0x18 u32 Size (dwords, whole module)    0x1C u16 TxtSvn  0x1E u16 SeSvn
    0x20..0x37 code control, error entry, GDT limit/base, segment selector, entry point
    0x38 64 reserved bytes                  0x78 u32 KeySize (dwords)  0x7C u32 ScratchSize (dwords)
  The user area, which starts with the info table, is at (HeaderLen + ScratchSize) * 4
  (161+143 dwords for header version 0 with RSA-2048, 224+208 for version 3 with RSA-3072).

  Info table: 16-byte UUID aa3ac07f-a746-db18-2eac-698f8d417f5a (as stored), u8
  ChipsetACMType (low 3 bits: 0 BIOS, 1 SINIT; bit 3 revocation), u8 Version,
  u16 Length, u32 ChipsetIDList (offset from module start), u32 OsSinitDataVer,
  u32 MinMleHeaderVer, u32 Capabilities, u8 AcmVersion, 3 reserved,
  [version >= 4] u32 ProcessorIDList, [version >= 5] u32 TPMInfoList.

  Chipset ID list: u32 count, then 16-byte entries {u32 flags (bit0: RevisionID is a
  mask), u16 VendorID, u16 DeviceID, u16 RevisionID, u16 reserved, u32 ExtendedID}.
  Processor ID list: u32 count, then 24-byte entries {u32 FMS, u32 FMSMask,
  u64 PlatformID, u64 PlatformMask}.

Matching (SDG §A.1.2 and tboot's does_acmod_match_platform): VendorID and
DeviceID equal TXT.DIDVID's, RevisionID equal, or ANDed non-zero when flags
bit0 is set; the debug-signed flag must agree with VER.EMIF's DEBUG.FUSE
(drtm.md §3.6).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relaunchd.errors import RelaunchError

MODULE_TYPE_CHIPSET = 2
SUBTYPE_TXT = 0
VENDOR_INTEL = 0x8086
ACM_TYPE_BIOS = 0
ACM_TYPE_SINIT = 1
ACM_TYPE_MASK = 0x7
ACM_TYPE_REVOCATION = 0x8
FLAG_PRE_PRODUCTION = 1 << 14
FLAG_DEBUG_SIGNED = 1 << 15
CHIPSET_FLAG_REVISION_MASK = 1
INFO_UUID = bytes.fromhex("aa3ac07fa746db182eac698f8d417f5a")

HEADER_FIXED = 0x80           # bytes up to and including ScratchSize
INFO_FIXED = 40               # info table through the reserved bytes (version < 4)
CHIPSET_ENTRY = 16
PROCESSOR_ENTRY = 24
MAX_MODULE = 4 << 20          # real SINITs are 200-400 KiB; refuse anything silly
MAX_LIST_ENTRIES = 1024       # bounds the work a hostile count can cause

_HEADER = struct.Struct("<HHIIHHIIIHH")   # 0x00 .. 0x1F
_KEY_SCRATCH = struct.Struct("<II")       # 0x78
_INFO = struct.Struct("<16sBBHIIIIB3x")   # 40 bytes


class InvalidAcm(RelaunchError):
    """The bytes are not an Intel ACM this parser understands."""

    name = "InvalidAcm"


@dataclass(frozen=True)
class ChipsetId:
    flags: int
    vendor_id: int
    device_id: int
    revision_id: int
    extended_id: int

    @property
    def revision_is_mask(self) -> bool:
        return bool(self.flags & CHIPSET_FLAG_REVISION_MASK)

    def matches(self, vendor_id: int, device_id: int, revision_id: int) -> bool:
        if (self.vendor_id, self.device_id) != (vendor_id, device_id):
            return False
        if self.revision_is_mask:
            return bool(self.revision_id & revision_id)
        return self.revision_id == revision_id


@dataclass(frozen=True)
class ProcessorId:
    fms: int
    fms_mask: int
    platform_id: int
    platform_mask: int


@dataclass(frozen=True)
class AcmHeader:
    module_type: int
    module_subtype: int
    header_len: int          # dwords
    header_version: int
    chipset_id: int
    flags: int
    vendor: int
    date: int                # BCD, e.g. 0x20240131
    size: int                # bytes (the header field is dwords)
    txt_svn: int
    se_svn: int
    key_size: int            # dwords
    scratch_size: int        # dwords

    @property
    def debug_signed(self) -> bool:
        return bool(self.flags & FLAG_DEBUG_SIGNED)

    @property
    def pre_production(self) -> bool:
        return bool(self.flags & FLAG_PRE_PRODUCTION)

    @property
    def date_text(self) -> str:
        return f"{self.date >> 16:04x}-{(self.date >> 8) & 0xFF:02x}-{self.date & 0xFF:02x}"


@dataclass(frozen=True)
class AcmInfo:
    acm_type: int            # ChipsetACMType & 7
    revocation: bool
    version: int
    length: int
    os_sinit_data_version: int
    min_mle_header_version: int
    capabilities: int
    acm_version: int
    chipset_ids: tuple[ChipsetId, ...]
    processor_ids: tuple[ProcessorId, ...] | None   # None: table version < 4, no list


@dataclass(frozen=True)
class Acm:
    header: AcmHeader
    info: AcmInfo

    @property
    def is_sinit(self) -> bool:
        return (self.header.module_subtype == SUBTYPE_TXT
                and self.info.acm_type == ACM_TYPE_SINIT and not self.info.revocation)

    def matching_chipset(self, vendor_id: int, device_id: int,
                         revision_id: int) -> ChipsetId | None:
        for entry in self.info.chipset_ids:
            if entry.matches(vendor_id, device_id, revision_id):
                return entry
        return None

    def matches_processor(self, fms: int) -> bool | None:
        """FMS against the processor list; None when the ACM has no list.

        PlatformID (MSR 0x17) is not compared: reading it needs the msr driver
        and the FMS match is what tells ACM generations apart.
        """
        if self.info.processor_ids is None:
            return None
        return any((fms & p.fms_mask) == (p.fms & p.fms_mask) for p in self.info.processor_ids)


def _u32_at(data: bytes, offset: int, what: str) -> int:
    if offset < 0 or offset + 4 > len(data):
        raise InvalidAcm(f"{what} at 0x{offset:x} is outside the {len(data)}-byte module")
    return int.from_bytes(data[offset:offset + 4], "little")


def parse_header(data: bytes) -> AcmHeader:
    if len(data) < HEADER_FIXED:
        raise InvalidAcm(f"{len(data)} bytes is too short for an ACM header")
    (module_type, subtype, header_len, header_version, chipset_id, flags, vendor, date,
     size_dw, txt_svn, se_svn) = _HEADER.unpack_from(data, 0)
    key_size, scratch_size = _KEY_SCRATCH.unpack_from(data, 0x78)
    if module_type != MODULE_TYPE_CHIPSET:
        raise InvalidAcm(f"module type {module_type} is not a chipset ACM (2)")
    if vendor != VENDOR_INTEL:
        raise InvalidAcm(f"module vendor 0x{vendor:x} is not Intel (0x8086)")
    if header_len * 4 < HEADER_FIXED:
        raise InvalidAcm(f"header length {header_len} dwords is shorter than the fixed header")
    return AcmHeader(module_type, subtype, header_len, header_version, chipset_id, flags,
                     vendor, date, size_dw * 4, txt_svn, se_svn, key_size, scratch_size)


def parse(data: bytes) -> Acm:
    """Header, info table and ID lists of an ACM; every offset is bounds-checked."""
    header = parse_header(data)
    if header.size > MAX_MODULE:
        raise InvalidAcm(f"module size {header.size} bytes is implausibly large")
    if header.size > len(data):
        raise InvalidAcm(f"module says {header.size} bytes but the file has {len(data)}")
    module = data[:header.size]   # offsets below are relative to the module start
    info_off = (header.header_len + header.scratch_size) * 4
    if info_off + INFO_FIXED > len(module):
        raise InvalidAcm(f"info table at 0x{info_off:x} is outside the module")
    (uuid, acm_type, version, length, chipset_off, os_sinit_ver, min_mle, caps,
     acm_version) = _INFO.unpack_from(module, info_off)
    if uuid != INFO_UUID:
        raise InvalidAcm("info table UUID is not the TXT ACM UUID")
    processor_ids: tuple[ProcessorId, ...] | None = None
    if version >= 4:
        proc_off = _u32_at(module, info_off + INFO_FIXED, "processor ID list pointer")
        processor_ids = tuple(
            ProcessorId(*struct.unpack_from("<IIQQ", module, off))
            for off in _entries(module, proc_off, PROCESSOR_ENTRY, "processor ID list"))
    chipset_ids = tuple(
        _chipset(module, off) for off in _entries(module, chipset_off, CHIPSET_ENTRY,
                                                  "chipset ID list"))
    info = AcmInfo(acm_type & ACM_TYPE_MASK, bool(acm_type & ACM_TYPE_REVOCATION), version,
                   length, os_sinit_ver, min_mle, caps, acm_version, chipset_ids,
                   processor_ids)
    return Acm(header, info)


def _entries(module: bytes, list_off: int, entry_size: int, what: str) -> range:
    count = _u32_at(module, list_off, f"{what} count")
    if count > MAX_LIST_ENTRIES:
        raise InvalidAcm(f"{what} claims {count} entries")
    start = list_off + 4
    if start + count * entry_size > len(module):
        raise InvalidAcm(f"{what} ({count} entries at 0x{list_off:x}) runs past the module")
    return range(start, start + count * entry_size, entry_size)


def _chipset(module: bytes, off: int) -> ChipsetId:
    flags, vid, did, rid, _reserved, ext = struct.unpack_from("<IHHHHI", module, off)
    return ChipsetId(flags, vid, did, rid, ext)


def cpu_fms(family: int, model: int, stepping: int) -> int:
    """CPUID.01H:EAX rebuilt from /proc/cpuinfo's decimal family/model/stepping (SDM Vol. 2A
    CPUID "Version Information"): extended family only above 15, extended model in 19:16."""
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family >= 0xF else 0
    return ((ext_family & 0xFF) << 20 | ((model >> 4) & 0xF) << 16 | base_family << 8
            | (model & 0xF) << 4 | (stepping & 0xF))


# SDG Table 4, MLE/SINIT capability bits (the ACM info table's Capabilities).
CAP_WAKE_GETSEC = 1 << 0
CAP_WAKE_MONITOR = 1 << 1
CAP_ECX_PAGE_TABLES = 1 << 2
CAP_PCR_DA_MAPPING = 1 << 5      # TPM 1.2 "details/authorities" usage; must be 1 for TPM 2.0
CAP_TPM20_TCG_LOG = 1 << 9


@dataclass(frozen=True)
class PlatformFit:
    """How an ACM fits a platform; `reason` is the `relaunchctl check` reason id."""

    fits: bool
    reason: str
    message: str


def platform_fit(module: Acm, *, vendor_id: int, device_id: int, revision_id: int,
                 production_fused: bool | None, fms: int | None) -> PlatformFit:
    """The rules `relaunchctl check` applies to the ACMs it finds (SDG A.1.2, drtm.md
    §3.6): a SINIT, a chipset ID entry for TXT.DIDVID, debug/production signing equal
    to VER.EMIF's fuse (unknown: not held against it), a processor ID entry for the
    CPU's FMS when the ACM has a list. Reason ids as in docs/check.md."""
    chip = f"{vendor_id:04x}:{device_id:04x} rev 0x{revision_id:x}"
    if not module.is_sinit:
        return PlatformFit(False, "sinit-acm-not-sinit",
                           "the ACM is not a SINIT (type/subtype) or is a revocation ACM")
    if module.matching_chipset(vendor_id, device_id, revision_id) is None:
        return PlatformFit(False, "sinit-acm-mismatch",
                           f"the ACM does not list this chipset ({chip})")
    if production_fused is not None and module.header.debug_signed == production_fused:
        signed = "debug" if module.header.debug_signed else "production"
        fused = "production" if production_fused else "debug"
        return PlatformFit(False, "sinit-acm-fuse-mismatch",
                           f"the ACM is {signed}-signed, the chipset is {fused}-fused")
    if fms is not None and module.matches_processor(fms) is False:
        return PlatformFit(False, "sinit-acm-fuse-mismatch",
                           f"the ACM lists chipset {chip} but not this CPU (FMS 0x{fms:x})")
    return PlatformFit(True, "sinit-acm", f"SINIT ACM fits chipset {chip}")


def os_sinit_capabilities(info: AcmInfo) -> int:
    """The OsSinitData.Capabilities relaunchd requests from this SINIT for a Secure
    Launch v16 kernel (whose MLE header offers 0x227): D/A PCR usage (required with
    TPM 2.0), RLP wake-up by MONITOR if offered else GETSEC[WAKEUP], the MLE page
    tables in ECX (v16 sl_stub finds the MLE through them), the TCG TPM 2.0 log.
    Raises InvalidAcm naming what the SINIT lacks."""
    caps = info.capabilities
    missing = [name for bit, name in ((CAP_ECX_PAGE_TABLES, "MLE page tables in ECX"),
                                      (CAP_TPM20_TCG_LOG, "the TCG TPM 2.0 event log"),
                                      (CAP_PCR_DA_MAPPING, "details/authorities PCR usage"))
               if not caps & bit]
    if not caps & (CAP_WAKE_MONITOR | CAP_WAKE_GETSEC):
        missing.append("an RLP wake-up method")
    if missing:
        raise InvalidAcm(f"the SINIT ACM (capabilities 0x{caps:x}) lacks "
                         f"{', '.join(missing)}, which a Secure Launch v16 kernel needs")
    wake = CAP_WAKE_MONITOR if caps & CAP_WAKE_MONITOR else CAP_WAKE_GETSEC
    return CAP_PCR_DA_MAPPING | wake | CAP_ECX_PAGE_TABLES | CAP_TPM20_TCG_LOG
