"""Secure Launch Resource Table (SLRT): builder, parser, measurement policy (formats layer, pure).

Facts: docs/research/drtm.md §1 (layouts of `include/linux/slr_table.h` per
Secure Launch patch revision), §1.6 (GRUB's default policy and its quirks),
§4.5 (which measured entities are deterministic). Bytes in, values out: no I/O,
no globals beyond constants.

Layout revision: Secure Launch v16 only (docs/slrt-policy.md "Which revision").
The table header carries `revision = 1` in every posting, so the bytes do not say
which patch series they were written for; `layout=` names it and only 16 is
accepted: DL_INFO 88 B (dlme_header_offset, dlme_config_table, `dl_launch`),
INTEL_INFO 560 B (boot_params_addr first), as patch 17/38 defines them. relaunchd's
DL handler speaks only v16's `dl_launch(bl_context, dlme)`; the older layouts
(72-byte DL_INFO with a one-argument `dl_handler`, and an INTEL_INFO whose
boot_params_addr appears in a different posting depending on the source) are
refused with `Unsupported` rather than built from unconfirmed offsets.
AMD_INFO has no body in v16 (Linux defines only the tag; no setup_data type is
assigned to the SLRT), so it is kept as a raw entry.

Table shape (§1.2): 16-byte header {magic "MTRD", u16 revision, u16 architecture,
u32 size, u32 max_size}, then TLV entries {u32 tag, u32 size (whole entry)},
terminated by END {0xFFFF, 8}. `size` counts header + entries + END.

What the parser rejects (all as `InvalidTable`), beyond what the kernel's own
walker checks (it checks nothing, §1.2 "Note"):
  * truncated header / data shorter than `size`, bad magic, table revision ≠ 1,
    unknown architecture, `size` too small for header + END, `size > max_size`;
  * an entry header that does not fit, an entry length < 8 or running past
    `size`, an entry length not a multiple of 8 (every v10+ structure is
    8-byte sized, "everything 8b aligned", §1.2), bytes after END, no END;
  * a known entry whose length differs from its layout size (a short entry
    would overlap the next one), a policy whose `nr_entries` does not match its
    length, duplicate tags (the kernel's lookup finds only the first);
  * non-zero reserved fields, unknown flags, non-ASCII or non-zero-padded
    `evt_info` — so that an accepted table has exactly one byte representation
    and `build(parse(b))` reproduces `b` up to `size`;
  * a table without DL_INFO, LOG_INFO, ENTRY_POLICY, or (on TXT) INTEL_INFO
    (the spec marks them REQUIRED, §1.4).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from relaunchd.errors import InvalidTable, Unsupported

# §1.2 / §1.3 constants.
MAGIC = 0x4452544D                      # bytes "MTRD"
TABLE_REVISION = 1
POLICY_REVISION = 1
ARCH_INTEL_TXT = 1
ARCH_AMD_SKINIT = 2
ARCHITECTURES = (ARCH_INTEL_TXT, ARCH_AMD_SKINIT)

BOOTLOADER_INVALID = 0
BOOTLOADER_GRUB = 1                     # the only allocated id; AMD SKL accepts nothing else

LOG_TPM12 = 1
LOG_TPM20 = 2
LOG_FORMATS = (LOG_TPM12, LOG_TPM20)

FLAG_MEASURED = 0x1
FLAG_IMPLICIT_SIZE = 0x2
FLAGS_KNOWN = FLAG_MEASURED | FLAG_IMPLICIT_SIZE

EVT_INFO_LEN = 32                       # TPM_EVENT_INFO_LENGTH
VARIABLE_MTRRS = 32                     # TXT_VARIABLE_MTRRS_LENGTH

TAG_INVALID = 0x0000
TAG_DL_INFO = 0x0001
TAG_LOG_INFO = 0x0002
TAG_ENTRY_POLICY = 0x0003
TAG_INTEL_INFO = 0x0004
TAG_AMD_INFO = 0x0005
TAG_ARM_INFO = 0x0006
TAG_UEFI_INFO = 0x0007
TAG_UEFI_CONFIG = 0x0008
TAG_END = 0xFFFF

ET_UNSPECIFIED = 0x0000
ET_SLRT = 0x0001
ET_BOOT_PARAMS = 0x0002
ET_SETUP_DATA = 0x0003
ET_CMDLINE = 0x0004
ET_UEFI_MEMMAP = 0x0005
ET_RAMDISK = 0x0006
ET_TXT_OS2MLE = 0x0010
ET_UNUSED = 0xFFFF

DRTM_PCR_RANGE = range(17, 23)               # TCG D-RTM PCRs 17–22 (§4.1)
SL_EVTYPE_SECURE_LAUNCH = 0x502         # event type of every policy measurement (§4.3)

# MSRs saved into INTEL_INFO (§1.4; Intel SDM vol. 4).
MSR_MTRRCAP = 0xFE
MSR_MISC_ENABLE = 0x1A0
MSR_MTRR_PHYSBASE0 = 0x200              # PHYSBASEn = 0x200 + 2n, PHYSMASKn = 0x201 + 2n
MSR_MTRR_DEF_TYPE = 0x2FF

LAYOUT_V16 = 16
LAYOUTS = (LAYOUT_V16,)

HEADER_SIZE = 16
ENTRY_HDR_SIZE = 8
END_SIZE = ENTRY_HDR_SIZE
ALIGN = 8
DEFAULT_MAX_SIZE = 4096                 # one page; GRUB reserves 4 KiB for the SLRT (§1.7)
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1

_HEADER = struct.Struct("<IHHII")
_ENTRY_HDR = struct.Struct("<II")
_BL_CONTEXT = struct.Struct("<H6xQ")    # u16 bootloader, u16 reserved[3], u64 context
_DL_V16 = struct.Struct("<7Q16sQ")      # after hdr; 88 - 8
_LOG = struct.Struct("<HHIQ")           # format, reserved, size, addr
_POLICY_HDR = struct.Struct("<4H")      # reserved[2], revision, nr_entries
_POLICY_ENTRY = struct.Struct("<4HQQ32s")
_MTRR_HEAD = struct.Struct("<QQ")       # default_mem_type, mtrr_vcnt
_MTRR_PAIRS = struct.Struct(f"<{2 * VARIABLE_MTRRS}Q")

DL_INFO_SIZE_V16 = ENTRY_HDR_SIZE + _DL_V16.size              # 88
LOG_INFO_SIZE = ENTRY_HDR_SIZE + _LOG.size                    # 24
POLICY_HDR_SIZE = ENTRY_HDR_SIZE + _POLICY_HDR.size           # 16
POLICY_ENTRY_SIZE = _POLICY_ENTRY.size                        # 56
SAVED_MTRRS_SIZE = _MTRR_HEAD.size + _MTRR_PAIRS.size         # 528
INTEL_INFO_SIZE = ENTRY_HDR_SIZE + 8 + 8 + 8 + SAVED_MTRRS_SIZE  # 560


def dl_info_size(layout: int = LAYOUT_V16) -> int:
    """88 in v16 (§1.4)."""
    _check_layout(layout)
    return DL_INFO_SIZE_V16


def intel_info_size(layout: int = LAYOUT_V16) -> int:
    """560 in v16 (§1.4)."""
    _check_layout(layout)
    return INTEL_INFO_SIZE


# ---------------------------------------------------------------------------
# Records

@dataclass(frozen=True)
class TableHeader:
    """The 16-byte `struct slr_table` header as found in the bytes (§1.2)."""

    revision: int
    architecture: int
    size: int
    max_size: int


@dataclass(frozen=True)
class BlContext:
    """`struct slr_bl_context`: handed to the DL handler (`dl_launch`'s first argument)."""

    bootloader: int = BOOTLOADER_GRUB
    context: int = 0


@dataclass(frozen=True)
class DlInfo:
    """SLR_ENTRY_DL_INFO. DCE = the SINIT ACM segment (AMD: the SLB), DLME = the
    kernel, `dl_launch` = the DL handler's entry (`dl_handler` before v16).
    `dlme_entry` and `dlme_header_offset` are offsets within the DLME (§1.4)."""

    dce_base: int
    dce_size: int
    dlme_base: int
    dlme_size: int
    dlme_entry: int
    dl_launch: int
    bl_context: BlContext = field(default_factory=BlContext)
    dlme_header_offset: int = 0
    dlme_config_table: int = 0          # boot_params for Linux


@dataclass(frozen=True)
class LogInfo:
    """SLR_ENTRY_LOG_INFO: the DRTM event-log buffer SINIT and the kernel append to."""

    addr: int
    size: int
    format: int = LOG_TPM20


@dataclass(frozen=True)
class PolicyEntry:
    """One `slr_policy_entry` (56 bytes): what the kernel hashes, into which PCR."""

    pcr: int
    entity_type: int
    entity: int
    size: int
    evt_info: str                       # ASCII, ≤ 32 bytes (unterminated when exactly 32)
    flags: int = 0


@dataclass(frozen=True)
class EntryPolicy:
    """SLR_ENTRY_ENTRY_POLICY (the spec's DRTM_POLICY): entries in measurement order."""

    entries: tuple[PolicyEntry, ...]
    revision: int = POLICY_REVISION


@dataclass(frozen=True)
class MtrrPair:
    physbase: int
    physmask: int


@dataclass(frozen=True)
class IntelInfo:
    """SLR_ENTRY_INTEL_INFO. MTRRs and MISC_ENABLE as they will be when the DL
    handler runs; the kernel compares them after launch (§1.4). `variable_mtrrs`
    holds the first `mtrr_vcnt` = MTRRcap[7:0] pairs; the rest are stored as 0."""

    txt_heap: int
    saved_misc_enable: int
    default_mem_type: int
    variable_mtrrs: tuple[MtrrPair, ...] = ()
    boot_params_addr: int = 0


@dataclass(frozen=True)
class RawEntry:
    """Any other tag (AMD_INFO, ARM_INFO, UEFI_INFO, UEFI_CONFIG, future ones), verbatim."""

    tag: int
    body: bytes = b""                   # everything after the 8-byte entry header


Entry = DlInfo | LogInfo | EntryPolicy | IntelInfo | RawEntry


@dataclass(frozen=True)
class Table:
    """A whole SLRT without its END entry (the builder always appends exactly one)."""

    architecture: int
    entries: tuple[Entry, ...]
    max_size: int = DEFAULT_MAX_SIZE


def entry_tag(entry: Entry) -> int:
    if isinstance(entry, RawEntry):
        return entry.tag
    return _TAGS[type(entry)]


_TAGS: dict[type, int] = {
    DlInfo: TAG_DL_INFO, LogInfo: TAG_LOG_INFO, EntryPolicy: TAG_ENTRY_POLICY,
    IntelInfo: TAG_INTEL_INFO,
}


# ---------------------------------------------------------------------------
# Building

def _check_layout(layout: int) -> None:
    if layout not in LAYOUTS:
        raise Unsupported(
            f"Secure Launch v{layout} SLRT layout is not supported: relaunchd builds and "
            f"reads only the v{LAYOUT_V16} layout (docs/slrt-policy.md)")


def _pack(st: struct.Struct, what: str, *values: object) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as e:           # a field out of range for its width
        raise InvalidTable(f"{what}: field out of range ({e})") from None


def _hdr(tag: int, size: int) -> bytes:
    return _ENTRY_HDR.pack(tag, size)


def _encode_evt_info(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidTable(f"evt_info {text!r} is not ASCII") from None
    if len(raw) > EVT_INFO_LEN or b"\0" in raw:
        raise InvalidTable(f"evt_info {text!r} must be ≤ {EVT_INFO_LEN} ASCII bytes without NUL")
    return raw


def _entry_bytes(entry: Entry, layout: int) -> bytes:
    """One entry, header included, in the given layout."""
    if isinstance(entry, DlInfo):
        ctx = _pack(_BL_CONTEXT, "bl_context", entry.bl_context.bootloader,
                    entry.bl_context.context)
        body = _pack(_DL_V16, "DL_INFO", entry.dce_size, entry.dce_base, entry.dlme_size,
                     entry.dlme_base, entry.dlme_entry, entry.dlme_header_offset,
                     entry.dlme_config_table, ctx, entry.dl_launch)
        return _hdr(TAG_DL_INFO, DL_INFO_SIZE_V16) + body
    if isinstance(entry, LogInfo):
        if entry.format not in LOG_FORMATS:
            raise InvalidTable(f"LOG_INFO: unknown log format {entry.format}")
        return _hdr(TAG_LOG_INFO, LOG_INFO_SIZE) + _pack(
            _LOG, "LOG_INFO", entry.format, 0, entry.size, entry.addr)
    if isinstance(entry, EntryPolicy):
        n = len(entry.entries)
        if entry.revision != POLICY_REVISION:
            raise InvalidTable(f"ENTRY_POLICY: revision {entry.revision} "
                               f"(only {POLICY_REVISION} is defined)")
        if n > U16:
            raise InvalidTable(f"ENTRY_POLICY: {n} entries do not fit nr_entries")
        out = [_hdr(TAG_ENTRY_POLICY, POLICY_HDR_SIZE + POLICY_ENTRY_SIZE * n),
               _POLICY_HDR.pack(0, 0, entry.revision, n)]
        for p in entry.entries:
            _check_policy_entry(p)
            out.append(_pack(_POLICY_ENTRY, "policy entry", p.pcr, p.entity_type, p.flags, 0,
                             p.size, p.entity, _encode_evt_info(p.evt_info)))
        return b"".join(out)
    if isinstance(entry, IntelInfo):
        pairs = entry.variable_mtrrs
        if len(pairs) > VARIABLE_MTRRS:
            raise InvalidTable(f"INTEL_INFO: {len(pairs)} variable MTRRs, at most "
                               f"{VARIABLE_MTRRS} fit")
        flat = [v for p in pairs for v in (p.physbase, p.physmask)]
        flat += [0] * (2 * VARIABLE_MTRRS - len(flat))
        addrs = _pack(struct.Struct("<QQ"), "INTEL_INFO", entry.boot_params_addr,
                      entry.txt_heap)
        return (_hdr(TAG_INTEL_INFO, INTEL_INFO_SIZE) + addrs
                + _pack(struct.Struct("<Q"), "INTEL_INFO", entry.saved_misc_enable)
                + _pack(_MTRR_HEAD, "INTEL_INFO", entry.default_mem_type, len(pairs))
                + _pack(_MTRR_PAIRS, "INTEL_INFO MTRRs", *flat))
    if isinstance(entry, RawEntry):
        if entry.tag in _KNOWN_TAGS or not 0 < entry.tag <= U16:
            raise InvalidTable(f"RawEntry cannot carry tag {entry.tag:#x}")
        if len(entry.body) % ALIGN:
            raise InvalidTable(f"entry {entry.tag:#x}: body of {len(entry.body)} bytes is not "
                               f"a multiple of {ALIGN}")
        size = ENTRY_HDR_SIZE + len(entry.body)
        if size > U32:
            raise InvalidTable(f"entry {entry.tag:#x} too large")
        return _hdr(entry.tag, size) + entry.body
    raise TypeError(f"not an SLRT entry: {entry!r}")


_KNOWN_TAGS = frozenset(_TAGS.values()) | {TAG_END, TAG_INVALID}


def _check_policy_entry(p: PolicyEntry) -> None:
    if p.flags & ~FLAGS_KNOWN:
        raise InvalidTable(f"policy entry {p.evt_info!r}: unknown flags {p.flags:#x}")
    # The kernel extends whatever PCR it is told (§1.4); a table of ours names
    # only the D-RTM PCRs. UNUSED slots are skipped by the kernel, so any value.
    if p.entity_type != ET_UNUSED and p.pcr not in DRTM_PCR_RANGE:
        raise InvalidTable(f"policy entry {p.evt_info!r}: PCR {p.pcr} is not a D-RTM PCR "
                           f"({DRTM_PCR_RANGE[0]}–{DRTM_PCR_RANGE[-1]})")


def _check_entry_set(tags: list[int], architecture: int) -> None:
    seen: set[int] = set()
    for tag in tags:
        if tag in seen:
            raise InvalidTable(f"duplicate entry with tag {tag:#x} (the kernel only finds "
                               f"the first)")
        seen.add(tag)
    required = [TAG_DL_INFO, TAG_LOG_INFO, TAG_ENTRY_POLICY]
    if architecture == ARCH_INTEL_TXT:
        required.append(TAG_INTEL_INFO)
    for tag in required:
        if tag not in seen:
            raise InvalidTable(f"required entry {_TAG_NAMES[tag]} is missing")


_TAG_NAMES = {TAG_DL_INFO: "DL_INFO", TAG_LOG_INFO: "LOG_INFO",
              TAG_ENTRY_POLICY: "ENTRY_POLICY", TAG_INTEL_INFO: "INTEL_INFO",
              TAG_END: "END"}


def build(table: Table, *, layout: int = LAYOUT_V16) -> bytes:
    """Serialize `table` in the slr_table.h layout of Secure Launch v`layout`.

    Returns `max_size` bytes: header, entries in the given order, END, then
    zeros up to `max_size` (the free space `slr_add_entry` may grow into)."""
    _check_layout(layout)
    if table.architecture not in ARCHITECTURES:
        raise InvalidTable(f"unknown architecture {table.architecture}")
    _check_entry_set([entry_tag(e) for e in table.entries], table.architecture)
    body = b"".join(_entry_bytes(e, layout) for e in table.entries) + _hdr(TAG_END, END_SIZE)
    size = HEADER_SIZE + len(body)
    if not size <= table.max_size <= U32:
        raise InvalidTable(f"table needs {size} bytes, max_size is {table.max_size}")
    head = _HEADER.pack(MAGIC, TABLE_REVISION, table.architecture, size, table.max_size)
    return head + body + bytes(table.max_size - size)


def entry_offset(table: Table, tag: int, *, layout: int = LAYOUT_V16) -> int:
    """Offset of the entry with `tag` inside `build(table)` — e.g. for
    OS2MLE.txt_info, which points at INTEL_INFO inside the SLRT (§1.5)."""
    _check_layout(layout)
    off = HEADER_SIZE
    for e in table.entries:
        if entry_tag(e) == tag:
            return off
        off += entry_size(e, layout=layout)
    raise InvalidTable(f"table has no entry with tag {tag:#x}")


def entry_size(entry: Entry, *, layout: int = LAYOUT_V16) -> int:
    """Bytes `entry` takes in the table, header included (values are not checked)."""
    _check_layout(layout)
    if isinstance(entry, DlInfo):
        return DL_INFO_SIZE_V16
    if isinstance(entry, IntelInfo):
        return INTEL_INFO_SIZE
    if isinstance(entry, LogInfo):
        return LOG_INFO_SIZE
    if isinstance(entry, EntryPolicy):
        return POLICY_HDR_SIZE + POLICY_ENTRY_SIZE * len(entry.entries)
    if isinstance(entry, RawEntry):
        return ENTRY_HDR_SIZE + len(entry.body)
    raise TypeError(f"not an SLRT entry: {entry!r}")


def table_size(table: Table, *, layout: int = LAYOUT_V16) -> int:
    """The header's `size` for `table`: header + entries + END (the minimum max_size)."""
    _check_layout(layout)
    return HEADER_SIZE + sum(entry_size(e, layout=layout) for e in table.entries) + END_SIZE


# ---------------------------------------------------------------------------
# Parsing

def read_header(data: bytes | bytearray | memoryview) -> TableHeader:
    """Decode and check the 16-byte header; does not walk the entries."""
    if len(data) < HEADER_SIZE:
        raise InvalidTable(f"truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, revision, arch, size, max_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidTable(f"bad magic {magic:#010x} (want {MAGIC:#010x}, 'MTRD')")
    if revision != TABLE_REVISION:
        raise InvalidTable(f"table revision {revision} (only {TABLE_REVISION} is defined)")
    if arch not in ARCHITECTURES:
        raise InvalidTable(f"unknown architecture {arch}")
    if size < HEADER_SIZE + END_SIZE:
        raise InvalidTable(f"size {size} is smaller than header + END "
                           f"({HEADER_SIZE + END_SIZE})")
    if size > max_size:
        raise InvalidTable(f"size {size} exceeds max_size {max_size}")
    if size % ALIGN:
        raise InvalidTable(f"size {size} is not a multiple of {ALIGN}")
    return TableHeader(revision, arch, size, max_size)


def parse(data: bytes | bytearray | memoryview, *, layout: int = LAYOUT_V16) -> Table:
    """Parse an SLRT written in the Secure Launch v`layout` layout.

    `data` must hold at least `size` bytes; bytes between `size` and
    `max_size` (free space) are not looked at. Raises InvalidTable."""
    _check_layout(layout)
    mv = memoryview(data)
    hdr = read_header(mv)
    if len(mv) < hdr.size:
        raise InvalidTable(f"truncated: header says {hdr.size} bytes, only {len(mv)} present")
    entries: list[Entry] = []
    tags: list[int] = []
    off = HEADER_SIZE
    while True:
        if off + ENTRY_HDR_SIZE > hdr.size:
            raise InvalidTable(f"no END entry before the end of the table ({hdr.size} bytes)")
        tag, esize = _ENTRY_HDR.unpack_from(mv, off)
        if esize < ENTRY_HDR_SIZE:
            raise InvalidTable(f"entry at {off:#x} (tag {tag:#x}): length {esize} is smaller "
                               f"than its header")
        if esize > hdr.size - off:
            raise InvalidTable(f"entry at {off:#x} (tag {tag:#x}): length {esize} runs past "
                               f"the table size {hdr.size}")
        if esize % ALIGN:
            raise InvalidTable(f"entry at {off:#x} (tag {tag:#x}): length {esize} is not a "
                               f"multiple of {ALIGN}")
        if tag == TAG_END:
            if esize != END_SIZE:
                raise InvalidTable(f"END entry at {off:#x} has length {esize}, want {END_SIZE}")
            if off + END_SIZE != hdr.size:
                raise InvalidTable(f"{hdr.size - off - END_SIZE} bytes after END inside size")
            break
        entries.append(_decode_entry(tag, bytes(mv[off:off + esize]), off, layout))
        tags.append(tag)
        off += esize
    _check_entry_set(tags, hdr.architecture)
    return Table(hdr.architecture, tuple(entries), hdr.max_size)


def _want_size(tag: int, raw: bytes, off: int, want: int) -> None:
    if len(raw) != want:
        raise InvalidTable(f"{_TAG_NAMES[tag]} at {off:#x}: length {len(raw)}, the layout "
                           f"needs {want}")


def _decode_entry(tag: int, raw: bytes, off: int, layout: int) -> Entry:
    where = f"{_TAG_NAMES.get(tag, hex(tag))} at {off:#x}"
    if tag == TAG_DL_INFO:
        _want_size(tag, raw, off, DL_INFO_SIZE_V16)
        (dce_size, dce_base, dlme_size, dlme_base, dlme_entry, hdr_off, cfg, ctx,
         launch) = _DL_V16.unpack_from(raw, ENTRY_HDR_SIZE)
        if any(ctx[2:8]):
            raise InvalidTable(f"{where}: bl_context reserved bytes are not zero")
        bootloader, context = _BL_CONTEXT.unpack(ctx)
        return DlInfo(dce_base, dce_size, dlme_base, dlme_size, dlme_entry, launch,
                      BlContext(bootloader, context), hdr_off, cfg)
    if tag == TAG_LOG_INFO:
        _want_size(tag, raw, off, LOG_INFO_SIZE)
        fmt, reserved, size, addr = _LOG.unpack_from(raw, ENTRY_HDR_SIZE)
        if reserved:
            raise InvalidTable(f"{where}: reserved field is not zero")
        if fmt not in LOG_FORMATS:
            raise InvalidTable(f"{where}: unknown log format {fmt}")
        return LogInfo(addr, size, fmt)
    if tag == TAG_ENTRY_POLICY:
        if len(raw) < POLICY_HDR_SIZE:
            raise InvalidTable(f"{where}: length {len(raw)} is smaller than the policy header")
        r0, r1, revision, n = _POLICY_HDR.unpack_from(raw, ENTRY_HDR_SIZE)
        if r0 or r1:
            raise InvalidTable(f"{where}: reserved words are not zero")
        if revision != POLICY_REVISION:
            raise InvalidTable(f"{where}: policy revision {revision} "
                               f"(only {POLICY_REVISION} is defined)")
        want = POLICY_HDR_SIZE + POLICY_ENTRY_SIZE * n
        if want > len(raw):
            raise InvalidTable(f"{where}: {n} policy entries need {want} bytes, the entry "
                               f"has {len(raw)}")
        if want != len(raw):
            raise InvalidTable(f"{where}: length {len(raw)} does not match {n} entries "
                               f"({want})")
        return EntryPolicy(tuple(_decode_policy_entry(raw, POLICY_HDR_SIZE + i * POLICY_ENTRY_SIZE,
                                                      where) for i in range(n)), revision)
    if tag == TAG_INTEL_INFO:
        _want_size(tag, raw, off, INTEL_INFO_SIZE)
        pos = ENTRY_HDR_SIZE + 8
        (boot_params,) = struct.unpack_from("<Q", raw, ENTRY_HDR_SIZE)
        txt_heap, misc = struct.unpack_from("<QQ", raw, pos)
        default_type, vcnt = _MTRR_HEAD.unpack_from(raw, pos + 16)
        flat = _MTRR_PAIRS.unpack_from(raw, pos + 16 + _MTRR_HEAD.size)
        if vcnt > VARIABLE_MTRRS:
            raise InvalidTable(f"{where}: mtrr_vcnt {vcnt} exceeds {VARIABLE_MTRRS}")
        if any(flat[2 * vcnt:]):
            raise InvalidTable(f"{where}: MTRR pairs beyond mtrr_vcnt {vcnt} are not zero")
        pairs = tuple(MtrrPair(flat[2 * i], flat[2 * i + 1]) for i in range(vcnt))
        return IntelInfo(txt_heap, misc, default_type, pairs, boot_params)
    if tag == TAG_INVALID or tag > U16:
        # tag 0 is SLR_ENTRY_INVALID; the kernel's lookup takes a u16 tag, so a
        # wider one could never be found and is garbage (§1.2 "Note").
        raise InvalidTable(f"entry at {off:#x}: invalid tag {tag:#x}")
    return RawEntry(tag, raw[ENTRY_HDR_SIZE:])


def _decode_policy_entry(raw: bytes, pos: int, where: str) -> PolicyEntry:
    pcr, etype, flags, reserved, size, entity, label = _POLICY_ENTRY.unpack_from(raw, pos)
    if reserved:
        raise InvalidTable(f"{where}: policy entry reserved field is not zero")
    text, _, tail = label.partition(b"\0")
    # Unused bytes are zeroed; the string may fill all 32 bytes unterminated (§1.4).
    if any(tail):
        raise InvalidTable(f"{where}: evt_info has bytes after its terminating NUL")
    try:
        evt = text.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidTable(f"{where}: evt_info is not ASCII") from None
    p = PolicyEntry(pcr, etype, entity, size, evt, flags)
    try:
        _check_policy_entry(p)
    except InvalidTable as e:
        raise InvalidTable(f"{where}: {e}") from None
    return p


# ---------------------------------------------------------------------------
# relaunchd's measurement policy (docs/slrt-policy.md)

SEAL_PCR = 17
DATA_PCR = 18

LABEL_KERNEL = "Measured Kernel image"
LABEL_INITRD = "Measured Kernel initrd"
LABEL_CMDLINE = "Measured Kernel command line"
LABEL_SLRT = "Measured SLR Table"
LABEL_BOOT_PARAMS = "Measured boot parameters"
LABEL_SETUP_DATA = "Measured Kernel setup_data"
LABEL_EFI_MEMMAP = "Measured EFI memory map"
ZERO_PAGE_SIZE = 4096


@dataclass(frozen=True)
class Region:
    """A physical address range of a staged segment."""

    addr: int
    size: int


def measured_cmdline(cmdline: str | bytes) -> bytes:
    """The cmdline bytes relaunchd places and measures: the text, then exactly one
    NUL, no fill. Unlike GRUB (quirk 2, §1.6) there is no `BOOT_IMAGE=` prefix and
    no zero-fill to the kernel's `cmdline_size`, so the digest depends on the
    cmdline alone, not on which kernel's setup header it is loaded with."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if b"\0" in raw:
        raise InvalidTable("cmdline contains a NUL byte")
    return raw + b"\0"


def default_policy(*, slrt_base: int, cmdline: Region, zero_page: int,
                   initrd: Region | None = None, setup_data: int = 0,
                   efi_memmap: Region | None = None, kernel_image: Region | None = None,
                   seal_pcr: int = SEAL_PCR, data_pcr: int = DATA_PCR) -> EntryPolicy:
    """relaunchd's policy: deterministic entities into `seal_pcr`, the rest into `data_pcr`.

    Sealing PCR, in this order: `kernel_image` (optional: an intact copy of the
    bzImage kept in its own segment, for a digest that does not depend on the
    v16 MLE extent), initrd, cmdline (`cmdline.size` must be
    `len(measured_cmdline(...))`), the SLRT entity (the kernel measures only
    INTEL_INFO with its two addresses zeroed, §1.6 quirk 4). The kernel itself is
    measured by SINIT as the MLE into PCR 17 whatever this policy says.

    Data PCR: the 4 KiB zero page, the setup_data chain (if any), the EFI
    memory map (if booted by UEFI) — all vary per boot (§4.5).

    OS2MLE is left out: the kernel skips it at version 1 (§1.6 quirk 3)."""
    if seal_pcr == data_pcr:
        raise InvalidTable(f"sealing PCR and data PCR must differ (both {seal_pcr})")

    def ent(pcr: int, etype: int, addr: int, size: int, label: str,
            flags: int = 0) -> PolicyEntry:
        return PolicyEntry(pcr, etype, addr, size, label, flags)

    out: list[PolicyEntry] = []
    if kernel_image is not None:
        out.append(ent(seal_pcr, ET_UNSPECIFIED, kernel_image.addr, kernel_image.size,
                       LABEL_KERNEL))
    if initrd is not None:
        # Size in `size`, address in `entity` (GRUB ORs the high size bits into
        # the address, §1.6 quirk 1).
        out.append(ent(seal_pcr, ET_RAMDISK, initrd.addr, initrd.size, LABEL_INITRD))
    out.append(ent(seal_pcr, ET_CMDLINE, cmdline.addr, cmdline.size, LABEL_CMDLINE))
    out.append(ent(seal_pcr, ET_SLRT, slrt_base, 0, LABEL_SLRT, FLAG_IMPLICIT_SIZE))
    out.append(ent(data_pcr, ET_BOOT_PARAMS, zero_page, ZERO_PAGE_SIZE, LABEL_BOOT_PARAMS))
    if setup_data:
        out.append(ent(data_pcr, ET_SETUP_DATA, setup_data, 0, LABEL_SETUP_DATA,
                       FLAG_IMPLICIT_SIZE))
    if efi_memmap is not None:
        out.append(ent(data_pcr, ET_UEFI_MEMMAP, efi_memmap.addr, efi_memmap.size,
                       LABEL_EFI_MEMMAP))
    for p in out:
        _check_policy_entry(p)
    return EntryPolicy(tuple(out))


def intel_info_from_msrs(rdmsr: Callable[[int], int], *, txt_heap: int,
                         boot_params_addr: int = 0) -> IntelInfo:
    """INTEL_INFO from an MSR reader (e.g. over /dev/cpu/0/msr, supplied by the
    caller): MISC_ENABLE, MTRRdefType and MTRRcap[7:0] variable pairs, as GRUB
    saves them. Valid only if nothing changes them before the DL handler runs."""
    vcnt = rdmsr(MSR_MTRRCAP) & 0xFF
    if vcnt > VARIABLE_MTRRS:
        raise InvalidTable(f"MTRRcap reports {vcnt} variable MTRRs, INTEL_INFO holds "
                           f"{VARIABLE_MTRRS}")
    pairs = tuple(MtrrPair(rdmsr(MSR_MTRR_PHYSBASE0 + 2 * i), rdmsr(MSR_MTRR_PHYSBASE0 + 2 * i + 1))
                  for i in range(vcnt))
    return IntelInfo(txt_heap, rdmsr(MSR_MISC_ENABLE), rdmsr(MSR_MTRR_DEF_TYPE), pairs,
                     boot_params_addr)


def intel_info_measured_bytes(info: IntelInfo, *, layout: int = LAYOUT_V16) -> bytes:
    """What the kernel hashes for an ET_SLRT policy entry: a copy of the whole
    INTEL_INFO entry (header included, 560 bytes in v16) with `boot_params_addr`
    and `txt_heap` zeroed (§1.6 quirk 4; v16 sl_main.c sl_extend_slrt)."""
    _check_layout(layout)
    return _entry_bytes(IntelInfo(0, info.saved_misc_enable, info.default_mem_type,
                                  info.variable_mtrrs, 0), layout)


@dataclass(frozen=True)
class PredictedEvent:
    """One SL_EVTYPE_SECURE_LAUNCH (0x502) event the kernel will log and extend."""

    pcr: int
    label: str
    digests: Mapping[str, bytes]        # bank name → digest of the measured bytes
    event_type: int = SL_EVTYPE_SECURE_LAUNCH


def sealed_events(policy: EntryPolicy, *, seal_pcr: int = SEAL_PCR, intel_info: IntelInfo,
                  cmdline: str | bytes,
                  initrd_digests: Mapping[str, bytes] | None = None,
                  kernel_image_digests: Mapping[str, bytes] | None = None,
                  banks: Iterable[str] = ("sha256",),
                  layout: int = LAYOUT_V16) -> list[PredictedEvent]:
    """The 0x502 events a Secure Launch kernel would extend into `seal_pcr` for
    `policy`, in policy order, with their digests — the deterministic part of a
    PCR prediction (§4.5 "log-template replay" substitutes these; SINIT's own
    events and MLE_HASH come from elsewhere).

    Small entities are hashed here (cmdline, INTEL_INFO); large ones (initrd,
    kernel image) are passed as digests computed in one pass by `hashing`.
    Raises InvalidTable if the policy names, for the sealing PCR, something whose
    bytes are not given or not deterministic."""
    banks = tuple(banks)
    cmd = measured_cmdline(cmdline)
    slrt_bytes = intel_info_measured_bytes(intel_info, layout=layout)

    def local(data: bytes) -> dict[str, bytes]:
        return {b: hashlib.new(b, data).digest() for b in banks}

    def given(d: Mapping[str, bytes] | None, what: str) -> dict[str, bytes]:
        if d is None or any(b not in d for b in banks):
            raise InvalidTable(f"policy measures the {what} into PCR {seal_pcr}, "
                               f"but its digests for {banks} were not given")
        return {b: d[b] for b in banks}

    out: list[PredictedEvent] = []
    for p in policy.entries:
        if p.pcr != seal_pcr or p.entity_type == ET_UNUSED:
            continue
        if p.entity_type == ET_CMDLINE:
            if p.size != len(cmd):
                raise InvalidTable(f"cmdline entry measures {p.size} bytes, the cmdline "
                                   f"rule gives {len(cmd)}")
            digests = local(cmd)
        elif p.entity_type == ET_SLRT:
            digests = local(slrt_bytes)
        elif p.entity_type == ET_RAMDISK:
            digests = given(initrd_digests, "initrd")
        elif p.entity_type == ET_UNSPECIFIED:
            digests = given(kernel_image_digests, "kernel image")
        else:
            raise InvalidTable(f"entity type {p.entity_type:#x} ({p.evt_info!r}) in the "
                               f"sealing PCR {seal_pcr} is not deterministic")
        out.append(PredictedEvent(p.pcr, p.evt_info, digests))
    return out
