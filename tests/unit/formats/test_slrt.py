"""SLRT builder and parser (relaunchd.formats.slrt) against the layouts of
docs/research/drtm.md §1.2–§1.4, relaunchd's measurement policy (§1.6, §4.5) and the
prediction helper."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidTable, RelaunchError, Unsupported
from relaunchd.formats import slrt


def h(text: str) -> bytes:
    """Hex with spaces/newlines for readability."""
    return bytes.fromhex("".join(text.split()))


# ---------------------------------------------------------------------------
# A full v16 table, written out byte by byte from drtm.md §1.2–§1.4.

DL = slrt.DlInfo(dce_base=0x7F000000, dce_size=0x30000, dlme_base=0x1000000, dlme_size=0xA00000,
                 dlme_entry=0x1C0, dl_launch=0x7E000000,
                 bl_context=slrt.BlContext(slrt.BOOTLOADER_GRUB, 0x12345678),
                 dlme_header_offset=0x2A000, dlme_config_table=0x90000)
LOG = slrt.LogInfo(addr=0x7D000000, size=0x10000, format=slrt.LOG_TPM20)
POLICY = slrt.EntryPolicy((
    slrt.PolicyEntry(17, slrt.ET_RAMDISK, 0x3000000, 0x200000, "Measured Kernel initrd"),
    # 32 characters: stored unterminated (§1.4 evt_info).
    slrt.PolicyEntry(18, slrt.ET_SLRT, 0x7C000000, 0, "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
                     slrt.FLAG_IMPLICIT_SIZE),
))
INTEL = slrt.IntelInfo(txt_heap=0x7A000000, saved_misc_enable=0x850089, default_mem_type=0xC06,
                       variable_mtrrs=(slrt.MtrrPair(0x6, 0xFF80000800),
                                       slrt.MtrrPair(0x80000000, 0xFFC0000800)),
                       boot_params_addr=0x90000)
TABLE = slrt.Table(slrt.ARCH_INTEL_TXT, (DL, LOG, POLICY, INTEL), max_size=1024)

EXPECTED_V16 = (
    # struct slr_table: magic "MTRD", revision 1, architecture 1 (TXT), size 824, max_size 1024
    h("4d545244 0100 0100 38030000 00040000")
    # DL_INFO: tag 1, size 88
    + h("01000000 58000000")
    + h("0000030000000000")            # +8  dce_size 0x30000
    + h("0000007f00000000")            # +16 dce_base 0x7f000000
    + h("0000a00000000000")            # +24 dlme_size 0xa00000
    + h("0000000100000000")            # +32 dlme_base 0x1000000
    + h("c001000000000000")            # +40 dlme_entry 0x1c0
    + h("00a0020000000000")            # +48 dlme_header_offset 0x2a000
    + h("0000090000000000")            # +56 dlme_config_table 0x90000
    + h("0100 000000000000 7856341200000000")  # +64 bl_context {GRUB, reserved[3], 0x12345678}
    + h("0000007e00000000")            # +80 dl_launch 0x7e000000
    # LOG_INFO: tag 2, size 24; format 2, reserved, size 0x10000, addr 0x7d000000
    + h("02000000 18000000 0200 0000 00000100 0000007d00000000")
    # ENTRY_POLICY: tag 3, size 16 + 2*56 = 128; reserved[2], revision 1, nr_entries 2
    + h("03000000 80000000 0000 0000 0100 0200")
    + h("1100 0600 0000 0000 0000200000000000 0000000300000000")   # PCR17 RAMDISK 2 MiB
    + b"Measured Kernel initrd" + bytes(10)
    + h("1200 0100 0200 0000 0000000000000000 0000007c00000000")   # PCR18 SLRT implicit
    + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    # INTEL_INFO: tag 4, size 560
    + h("04000000 30020000")
    + h("0000090000000000")            # +8  boot_params_addr 0x90000 (v15+)
    + h("0000007a00000000")            # +16 txt_heap
    + h("8900850000000000")            # +24 saved IA32_MISC_ENABLE
    + h("060c000000000000")            # +32 MTRRdefType
    + h("0200000000000000")            # +40 mtrr_vcnt 2
    + h("0600000000000000 00080080ff000000")  # +48 pair 0
    + h("0000008000000000 000800c0ff000000")  # +64 pair 1
    + bytes(30 * 16)                   # unused pairs are zero
    # END
    + h("ffff0000 08000000")
)


def test_full_v16_table_bytes():
    assert len(EXPECTED_V16) == 824
    built = slrt.build(TABLE)
    assert len(built) == 1024
    assert built[:824] == EXPECTED_V16
    assert built[824:] == bytes(200)
    assert slrt.parse(built) == TABLE
    assert slrt.parse(EXPECTED_V16) == TABLE      # free space after `size` is not needed
    assert slrt.read_header(built) == slrt.TableHeader(1, 1, 824, 1024)


def test_entry_offsets():
    assert slrt.entry_offset(TABLE, slrt.TAG_DL_INFO) == 16
    assert slrt.entry_offset(TABLE, slrt.TAG_LOG_INFO) == 16 + 88
    assert slrt.entry_offset(TABLE, slrt.TAG_INTEL_INFO) == 16 + 88 + 24 + 128
    off = slrt.entry_offset(TABLE, slrt.TAG_INTEL_INFO)
    assert EXPECTED_V16[off:off + 8] == h("04000000 30020000")
    with pytest.raises(InvalidTable):
        slrt.entry_offset(TABLE, slrt.TAG_AMD_INFO)


def test_only_the_v16_layout_is_built_or_read():
    """relaunchd pins the SLRT to Secure Launch v16 (docs/slrt-policy.md "Which
    revision"): its DL handler speaks only v16's dl_launch(bl_context, dlme), and the
    older postings' INTEL_INFO layouts are contradictory between sources."""
    for layout in (10, 12, 13, 14, 15):
        with pytest.raises(Unsupported, match=f"v{layout} SLRT layout is not supported: "
                                               "relaunchd builds and reads only the v16"):
            slrt.build(TABLE, layout=layout)
        with pytest.raises(Unsupported):
            slrt.parse(EXPECTED_V16, layout=layout)
    assert (slrt.dl_info_size(), slrt.intel_info_size()) == (88, 560)


def test_no_setup_data_type_of_ours_collides_with_the_kernels():
    """No setup_data type is assigned to the SLRT in v16, and type 10, which an AMD
    RFC used for SETUP_SECURE_LAUNCH, is mainline's SETUP_KEXEC_KHO
    (arch/x86/include/uapi/asm/setup_data.h). relaunchd's node type stays far above
    the kernel's enum, and AMD_INFO (header-only in v16) carries no setup_data."""
    from relaunchd.formats.x86 import boot_params as bp

    assert not hasattr(slrt, "SETUP_SECURE_LAUNCH")
    setup_kexec_kho = 10
    assert bp.SETUP_RELAUNCHD_SLRT not in range(0, 0x100)
    assert setup_kexec_kho != bp.SETUP_RELAUNCHD_SLRT
    amd = slrt.RawEntry(slrt.TAG_AMD_INFO)
    t = slrt.Table(slrt.ARCH_AMD_SKINIT, (DL, LOG, POLICY, amd), 4096)
    b = slrt.build(t)
    off = slrt.entry_offset(t, slrt.TAG_AMD_INFO)
    assert b[off:off + 8] == h("05000000 08000000")
    assert slrt.parse(b) == t


def test_raw_entries_round_trip():
    t = dataclasses.replace(TABLE, entries=(
        DL, slrt.RawEntry(slrt.TAG_UEFI_INFO), LOG, POLICY, INTEL,
        slrt.RawEntry(slrt.TAG_UEFI_CONFIG, bytes(range(16)))))
    b = slrt.build(t)
    off = slrt.entry_offset(t, slrt.TAG_UEFI_CONFIG)
    assert b[off:off + 24] == h("08000000 18000000") + bytes(range(16))
    assert slrt.parse(b) == t


# ---------------------------------------------------------------------------
# Malformed tables: every case is named.

def table_bytes(table: slrt.Table = TABLE, layout: int = 16) -> bytearray:
    return bytearray(slrt.build(table, layout=layout))


def reject(data: bytes | bytearray, match: str, layout: int = 16) -> None:
    with pytest.raises(InvalidTable, match=match):
        slrt.parse(bytes(data), layout=layout)


def set_u32(b: bytearray, off: int, value: int) -> bytearray:
    struct.pack_into("<I", b, off, value)
    return b


def set_u16(b: bytearray, off: int, value: int) -> bytearray:
    struct.pack_into("<H", b, off, value)
    return b


POLICY_OFF = 16 + 88 + 24
INTEL_OFF = POLICY_OFF + 128
END_OFF = 816


def test_bad_magic():
    b = table_bytes()
    b[0:4] = b"DRTM"
    reject(b, "bad magic")


def test_bad_table_revision():
    reject(set_u16(table_bytes(), 4, 2), "table revision 2")
    reject(set_u16(table_bytes(), 4, 0), "table revision 0")


def test_bad_architecture():
    reject(set_u16(table_bytes(), 6, 3), "unknown architecture 3")


def test_size_smaller_than_header():
    reject(set_u32(table_bytes(), 8, 8), "smaller than header")
    reject(set_u32(table_bytes(), 8, 16), "smaller than header")   # no room for END


def test_size_beyond_max_size():
    reject(set_u32(table_bytes(), 12, 800), "exceeds max_size")


def test_truncated():
    reject(EXPECTED_V16[:10], "truncated")
    reject(EXPECTED_V16[:823], "truncated")


def test_entry_length_zero():
    reject(set_u32(table_bytes(), 16 + 4, 0), "smaller than its header")


def test_entry_length_below_header():
    reject(set_u32(table_bytes(), 16 + 4, 4), "smaller than its header")


def test_entry_length_beyond_table():
    reject(set_u32(table_bytes(), INTEL_OFF + 4, 576), "runs past")
    reject(set_u32(table_bytes(), 16 + 4, 0xFFFFFFF8), "runs past")


def test_entry_length_unaligned():
    reject(set_u32(table_bytes(), 16 + 4, 92), "not a multiple of 8")


def test_table_size_unaligned():
    reject(set_u32(table_bytes(), 8, 828), "not a multiple of 8")


def test_short_entry_would_overlap_next():
    # A DL_INFO claiming 80 bytes puts the next header inside its v16 layout.
    reject(set_u32(table_bytes(), 16 + 4, 80), "DL_INFO at 0x10: length 80, the layout needs 88")


def test_missing_end():
    # Table size stops right after INTEL_INFO: the walk runs out without END.
    reject(set_u32(table_bytes(), 8, END_OFF), "no END")
    # END overwritten with an unknown tag.
    b = set_u32(table_bytes(), END_OFF, 0x1234)
    reject(b, "no END")


def test_end_with_wrong_length():
    b = table_bytes()
    set_u32(b, END_OFF + 4, 16)
    set_u32(b, 8, 832)
    reject(b, "END entry at 0x330 has length 16")


def test_bytes_after_end():
    b = table_bytes()
    set_u32(b, 8, 832)        # END followed by 8 more bytes inside size
    reject(b, "bytes after END")


def test_policy_count_beyond_size():
    reject(set_u16(table_bytes(), POLICY_OFF + 14, 3), "3 policy entries need 184 bytes")
    reject(set_u16(table_bytes(), POLICY_OFF + 14, 0xFFFF), "policy entries need")


def test_policy_count_short_of_size():
    reject(set_u16(table_bytes(), POLICY_OFF + 14, 1), "does not match 1 entries")


def test_policy_bad_revision_and_reserved():
    reject(set_u16(table_bytes(), POLICY_OFF + 12, 2), "policy revision 2")
    reject(set_u16(table_bytes(), POLICY_OFF + 8, 1), "reserved words")


def test_policy_entry_fields():
    e0 = POLICY_OFF + 16
    reject(set_u16(table_bytes(), e0 + 6, 1), "reserved field")
    reject(set_u16(table_bytes(), e0 + 4, 4), "unknown flags")
    reject(set_u16(table_bytes(), e0 + 0, 0), "PCR 0 is not a D-RTM PCR")
    b = table_bytes()
    b[e0 + 24 + 30] = ord("x")          # after the NUL of "Measured Kernel initrd"
    reject(b, "after its terminating NUL")
    b = table_bytes()
    b[e0 + 24] = 0xE9
    reject(b, "not ASCII")


def test_unused_policy_entry_may_name_any_pcr():
    pol = slrt.EntryPolicy((slrt.PolicyEntry(0, slrt.ET_UNUSED, 0, 0, ""),))
    t = dataclasses.replace(TABLE, entries=(DL, LOG, pol, INTEL))
    assert slrt.parse(slrt.build(t)) == t


def test_reserved_fields_elsewhere():
    reject(set_u16(table_bytes(), 16 + 64 + 2, 1), "bl_context reserved")
    reject(set_u16(table_bytes(), 16 + 88 + 10, 1), "reserved field")
    reject(set_u16(table_bytes(), 16 + 88 + 8, 3), "unknown log format 3")


def test_intel_info_mtrr_rules():
    reject(set_u32(table_bytes(), INTEL_OFF + 40, 33), "mtrr_vcnt 33")
    b = table_bytes()
    b[INTEL_OFF + 48 + 2 * 16] = 1      # pair 2 while mtrr_vcnt is 2
    reject(b, "beyond mtrr_vcnt")


def test_invalid_tag():
    t = dataclasses.replace(TABLE, entries=(*TABLE.entries, slrt.RawEntry(0x0100)))
    off = slrt.entry_offset(t, 0x0100)
    reject(set_u32(table_bytes(t), off, 0), "invalid tag 0x0")
    reject(set_u32(table_bytes(t), off, 0x10001), "invalid tag 0x10001")


def test_duplicate_entries():
    b = table_bytes()
    set_u32(b, 16 + 88, slrt.TAG_DL_INFO)   # LOG_INFO relabelled DL_INFO: wrong size first
    reject(b, "DL_INFO at 0x68: length 24")
    t = dataclasses.replace(TABLE, entries=(*TABLE.entries, slrt.RawEntry(0x0100),
                                            slrt.RawEntry(0x0101)))
    b = table_bytes(t)
    set_u32(b, slrt.entry_offset(t, 0x0101), 0x0100)
    reject(b, "duplicate entry with tag 0x100")


@pytest.mark.parametrize("drop", ["DL_INFO", "LOG_INFO", "ENTRY_POLICY", "INTEL_INFO"])
def test_missing_required_entry(drop):
    entries = tuple(e for e in TABLE.entries
                    if slrt._TAG_NAMES[slrt.entry_tag(e)] != drop)
    with pytest.raises(InvalidTable, match=f"required entry {drop} is missing"):
        slrt.build(dataclasses.replace(TABLE, entries=entries))
    # Same table bytes with that entry relabelled to an unknown tag.
    b = table_bytes()
    off = slrt.entry_offset(TABLE, slrt.entry_tag(next(
        e for e in TABLE.entries if slrt._TAG_NAMES[slrt.entry_tag(e)] == drop)))
    reject(set_u32(b, off, 0x0200), f"required entry {drop} is missing")


def test_amd_table_needs_no_intel_info():
    t = slrt.Table(slrt.ARCH_AMD_SKINIT, (DL, LOG, POLICY), 512)
    assert slrt.parse(slrt.build(t)) == t


def test_a_table_of_an_older_layout_is_refused():
    # v10–v15 DL_INFO is 72 bytes: a v16 reader sees a short entry, not garbage.
    b = table_bytes()
    set_u32(b, 16 + 4, 72)
    reject(b, "DL_INFO at 0x10: length 72, the layout needs 88")


@pytest.mark.parametrize("layout", [0, 8, 9, 15, 17])
def test_unsupported_layouts(layout):
    with pytest.raises(Unsupported, match=f"v{layout} SLRT layout is not supported"):
        slrt.build(TABLE, layout=layout)
    with pytest.raises(Unsupported):
        slrt.parse(EXPECTED_V16, layout=layout)


def test_builder_rejects_unrepresentable_tables():
    def bad(table: slrt.Table, match: str, layout: int = 16) -> None:
        with pytest.raises(InvalidTable, match=match):
            slrt.build(table, layout=layout)

    def with_entries(*entries: slrt.Entry) -> slrt.Table:
        return dataclasses.replace(TABLE, entries=entries)

    bad(dataclasses.replace(TABLE, max_size=800), "needs 824 bytes, max_size is 800")
    bad(with_entries(dataclasses.replace(DL, dce_base=1 << 64), LOG, POLICY, INTEL),
        "field out of range")
    bad(with_entries(DL, dataclasses.replace(LOG, size=1 << 32), POLICY, INTEL),
        "field out of range")
    long_label = slrt.PolicyEntry(17, slrt.ET_CMDLINE, 0, 1, "x" * 33)
    bad(with_entries(DL, LOG, slrt.EntryPolicy((long_label,)), INTEL), "≤ 32 ASCII")
    bad(with_entries(DL, LOG, slrt.EntryPolicy((dataclasses.replace(
        long_label, evt_info="é"),)), INTEL), "not ASCII")
    bad(with_entries(DL, LOG, slrt.EntryPolicy((dataclasses.replace(
        long_label, evt_info="ok", pcr=16),)), INTEL), "PCR 16")
    bad(with_entries(DL, LOG, slrt.EntryPolicy(()), dataclasses.replace(
        INTEL, variable_mtrrs=(slrt.MtrrPair(0, 0),) * 33)), "33 variable MTRRs")
    bad(with_entries(DL, LOG, POLICY, INTEL, slrt.RawEntry(0)), "cannot carry tag 0x0")
    bad(with_entries(DL, LOG, POLICY, INTEL, slrt.RawEntry(0x100, b"abc")), "multiple of 8")
    bad(with_entries(DL, DL, LOG, POLICY, INTEL), "duplicate entry with tag 0x1")
    bad(dataclasses.replace(TABLE, architecture=3), "unknown architecture")


def test_error_is_named():
    err = InvalidTable("x")
    assert isinstance(err, RelaunchError) and err.name == "InvalidTable"


# ---------------------------------------------------------------------------
# Property tests

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
label = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=32)


@st.composite
def policy_entries(draw) -> slrt.PolicyEntry:
    etype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0x10, 0xFFFF]) | u16)
    pcr = draw(u16 if etype == slrt.ET_UNUSED else st.integers(17, 22))
    return slrt.PolicyEntry(pcr, etype, draw(u64), draw(u64), draw(label),
                            draw(st.integers(0, 3)))


@st.composite
def tables(draw, layout: int) -> slrt.Table:
    dl = slrt.DlInfo(draw(u64), draw(u64), draw(u64), draw(u64), draw(u64), draw(u64),
                     slrt.BlContext(draw(u16), draw(u64)), draw(u64), draw(u64))
    log = slrt.LogInfo(draw(u64), draw(u32), draw(st.sampled_from(slrt.LOG_FORMATS)))
    pol = slrt.EntryPolicy(tuple(draw(st.lists(policy_entries(), max_size=8))))
    arch = draw(st.sampled_from(slrt.ARCHITECTURES))
    entries: list[slrt.Entry] = [dl, log, pol]
    if arch == slrt.ARCH_INTEL_TXT or draw(st.booleans()):
        pairs = draw(st.lists(st.builds(slrt.MtrrPair, u64, u64), max_size=32))
        entries.append(slrt.IntelInfo(draw(u64), draw(u64), draw(u64), tuple(pairs),
                                      draw(u64)))
    raw_tags = draw(st.lists(st.integers(5, 0xFFFE).filter(lambda t: t != 0x10),
                             unique=True, max_size=3))
    for tag in raw_tags:
        n = draw(st.integers(0, 3))
        entries.append(slrt.RawEntry(tag, draw(st.binary(min_size=8 * n, max_size=8 * n))))
    entries = draw(st.permutations(entries))
    t = slrt.Table(arch, tuple(entries))
    return dataclasses.replace(t, max_size=slrt.table_size(t, layout=layout)
                               + draw(st.integers(0, 64)))


layouts = st.sampled_from(list(slrt.LAYOUTS))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_round_trip_random_tables(data):
    layout = data.draw(layouts)
    t = data.draw(tables(layout))
    b = slrt.build(t, layout=layout)
    assert len(b) == t.max_size
    assert slrt.read_header(b).size == slrt.table_size(t, layout=layout)
    assert slrt.parse(b, layout=layout) == t
    assert slrt.parse(b[:slrt.read_header(b).size], layout=layout) == t


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parse_mutated_builds(data):
    """Only InvalidTable escapes, and whatever is accepted is canonical: rebuilding
    it gives the same bytes up to `size`."""
    layout = data.draw(layouts)
    b = bytearray(slrt.build(data.draw(tables(layout)), layout=layout))
    for _ in range(data.draw(st.integers(1, 6))):
        where = data.draw(st.integers(0, len(b) - 1))
        kind = data.draw(st.sampled_from(["byte", "u32", "truncate"]))
        if kind == "byte":
            b[where] = data.draw(st.integers(0, 255))
        elif kind == "u32" and where + 4 <= len(b):
            struct.pack_into("<I", b, where, data.draw(st.sampled_from(
                [0, 4, 8, 16, 0xFFFF, 0xFFFFFFFF]) | u32))
        else:
            del b[where:]
            break
    try:
        t = slrt.parse(bytes(b), layout=layout)
    except InvalidTable:
        return
    size = slrt.read_header(bytes(b)).size
    rebuilt = slrt.build(dataclasses.replace(t, max_size=size), layout=layout)
    assert rebuilt[:12] == b[:12] and rebuilt[16:] == b[16:size]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_parse_random_bytes(raw):
    with pytest.raises(InvalidTable):
        slrt.parse(raw)
    with pytest.raises(InvalidTable):
        slrt.parse(b"MTRD\x01\x00\x01\x00" + raw)


# ---------------------------------------------------------------------------
# relaunchd's measurement policy and predictions

def staged_policy(**kw) -> slrt.EntryPolicy:
    args = dict(slrt_base=0x7C000000, cmdline=slrt.Region(0x20000, 12), zero_page=0x90000,
                initrd=slrt.Region(0x3000000, 0x200000), setup_data=0x91000,
                efi_memmap=slrt.Region(0x92000, 0x1800))
    args.update(kw)
    return slrt.default_policy(**args)


def test_default_policy_split():
    pol = staged_policy()
    got = [(p.pcr, p.entity_type, p.entity, p.size, p.flags, p.evt_info) for p in pol.entries]
    assert got == [
        (17, slrt.ET_RAMDISK, 0x3000000, 0x200000, 0, "Measured Kernel initrd"),
        (17, slrt.ET_CMDLINE, 0x20000, 12, 0, "Measured Kernel command line"),
        (17, slrt.ET_SLRT, 0x7C000000, 0, slrt.FLAG_IMPLICIT_SIZE, "Measured SLR Table"),
        (18, slrt.ET_BOOT_PARAMS, 0x90000, 4096, 0, "Measured boot parameters"),
        (18, slrt.ET_SETUP_DATA, 0x91000, 0, slrt.FLAG_IMPLICIT_SIZE,
         "Measured Kernel setup_data"),
        (18, slrt.ET_UEFI_MEMMAP, 0x92000, 0x1800, 0, "Measured EFI memory map"),
    ]
    assert all(p.entity_type != slrt.ET_TXT_OS2MLE for p in pol.entries)
    t = slrt.Table(slrt.ARCH_INTEL_TXT, (DL, LOG, pol, INTEL))
    assert slrt.parse(slrt.build(t)) == t


def test_default_policy_options():
    pol = staged_policy(initrd=None, setup_data=0, efi_memmap=None,
                        kernel_image=slrt.Region(0x4000000, 0x900000), seal_pcr=20, data_pcr=21)
    assert [(p.pcr, p.entity_type) for p in pol.entries] == [
        (20, slrt.ET_UNSPECIFIED), (20, slrt.ET_CMDLINE), (20, slrt.ET_SLRT),
        (21, slrt.ET_BOOT_PARAMS)]
    with pytest.raises(InvalidTable, match="must differ"):
        staged_policy(seal_pcr=18)
    with pytest.raises(InvalidTable, match="PCR 16"):
        staged_policy(seal_pcr=16)


def test_measured_cmdline_rule():
    assert slrt.measured_cmdline("quiet root=/dev/vda") == b"quiet root=/dev/vda\0"
    assert slrt.measured_cmdline(b"quiet\0") == b"quiet\0"
    assert slrt.measured_cmdline("") == b"\0"
    with pytest.raises(InvalidTable, match="NUL"):
        slrt.measured_cmdline(b"a\0b")


def test_intel_info_measured_bytes():
    m = slrt.intel_info_measured_bytes(INTEL)
    assert len(m) == 560
    own = EXPECTED_V16[INTEL_OFF:INTEL_OFF + 560]
    assert m == own[:8] + bytes(16) + own[24:]       # boot_params_addr, txt_heap zeroed
    with pytest.raises(Unsupported):
        slrt.intel_info_measured_bytes(INTEL, layout=14)


def test_sealed_events():
    cmd = "console=ttyS0 relaunchd.id=1"
    pol = staged_policy(cmdline=slrt.Region(0x20000, len(cmd) + 1),
                        kernel_image=slrt.Region(0x4000000, 10))
    initrd = {"sha256": hashlib.sha256(b"initrd").digest(), "sha384": b"\x01" * 48}
    kernel = {"sha256": hashlib.sha256(b"kernel").digest(), "sha384": b"\x02" * 48}
    ev = slrt.sealed_events(pol, intel_info=INTEL, cmdline=cmd, initrd_digests=initrd,
                            kernel_image_digests=kernel, banks=("sha256", "sha384"))
    assert [(e.pcr, e.label, e.event_type) for e in ev] == [
        (17, "Measured Kernel image", 0x502), (17, "Measured Kernel initrd", 0x502),
        (17, "Measured Kernel command line", 0x502), (17, "Measured SLR Table", 0x502)]
    assert ev[0].digests == kernel and ev[1].digests == initrd
    assert ev[2].digests["sha256"] == hashlib.sha256(cmd.encode() + b"\0").digest()
    assert ev[2].digests["sha384"] == hashlib.sha384(cmd.encode() + b"\0").digest()
    # Addresses do not enter the prediction: a different heap/zero page gives the same digest.
    moved = dataclasses.replace(INTEL, txt_heap=1, boot_params_addr=2)
    ev2 = slrt.sealed_events(pol, intel_info=moved, cmdline=cmd, initrd_digests=initrd,
                             kernel_image_digests=kernel, banks=("sha256", "sha384"))
    assert ev2 == ev
    want = hashlib.sha256(slrt.intel_info_measured_bytes(INTEL)).digest()
    assert ev[3].digests["sha256"] == want


def test_sealed_events_refuses_what_it_cannot_predict():
    cmd = "quiet"
    pol = staged_policy(cmdline=slrt.Region(0x20000, 6))
    with pytest.raises(InvalidTable, match="initrd"):
        slrt.sealed_events(pol, intel_info=INTEL, cmdline=cmd)
    with pytest.raises(InvalidTable, match="rule gives 7"):
        slrt.sealed_events(pol, intel_info=INTEL, cmdline="quiet!", initrd_digests={
            "sha256": bytes(32)})
    with pytest.raises(InvalidTable, match="not deterministic"):
        slrt.sealed_events(pol, seal_pcr=18, intel_info=INTEL, cmdline=cmd)


def test_intel_info_from_msrs():
    msrs = {0xFE: 0x0D0A, 0x1A0: 0x850089, 0x2FF: 0xC06}
    for i in range(10):
        msrs[0x200 + 2 * i] = i << 32 | 6
        msrs[0x201 + 2 * i] = 0xFF00000800 | i << 12
    info = slrt.intel_info_from_msrs(msrs.__getitem__, txt_heap=0x7A000000,
                                     boot_params_addr=0x90000)
    assert info.saved_misc_enable == 0x850089 and info.default_mem_type == 0xC06
    assert len(info.variable_mtrrs) == 10
    assert info.variable_mtrrs[3] == slrt.MtrrPair(3 << 32 | 6, 0xFF00003800)
    msrs[0xFE] = 0x21
    with pytest.raises(InvalidTable, match="33 variable MTRRs"):
        slrt.intel_info_from_msrs(msrs.__getitem__, txt_heap=0)
