"""The built TXT DL handler (build/dl-handler/txt-dl-handler.bin), executed in an x86
emulator from the state the Secure Launch v16 decompressor calls it in, to
GETSEC[SENTER] (tests/support/txt_machine.py, txt_scenario.py).

What the handler leaves is decoded independently (tests/support/txt_sdg.py, from
the TXT SDG tables and the v16 headers), never with the handler's own layouts.
What only a TXT machine can show (SINIT accepting it all) is listed in
docs/drtm.md "What is proven where".
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from relaunchd.formats import slrt
from relaunchd.formats import txt_dl_handler as dlh
from relaunchd.platform import txt_registers
from support import txt_sdg as sdg
from support.txt_machine import (
    CALLEE_SAVED,
    CALLER_RFLAGS,
    DECOMP_CS,
    DECOMP_DS,
    DECOMP_GDT,
    DECOMP_IDT,
    DECOMP_PT,
    Platform,
)
from support.txt_scenario import (
    HANDLER_BIN,
    OS_SINIT_CAPS,
    Layout,
    Scenario,
    matching_acm,
    run,
    v16_mle_header,
)

pytestmark = pytest.mark.skipif(not HANDLER_BIN.exists(),
                                reason="run `make setup` to build the DL handler")

MSR_DEF_TYPE, MSR_PHYSBASE0 = 0x2FF, 0x200


def launched():
    st = run(Scenario(platform=Platform(mc_status={1: (1 << 63) | 0x1234})))
    assert st.outcome.kind == "senter", st.outcome.detail
    return st


@pytest.fixture(scope="module")
def st():
    return launched()


def test_senter_registers_and_cpu_mode(st):
    r, lay = st.outcome.regs, Layout()
    # GETSEC[SENTER]: EAX = 4, EBX = SINIT base, ECX = SINIT size, EDX = 0 (SDM 2D 7.3).
    assert r["rax"] & 0xFFFFFFFF == 4
    assert r["rbx"] & 0xFFFFFFFF == lay.sinit_region
    assert r["rcx"] & 0xFFFFFFFF == len(st.acm) == 0x520
    assert r["rdx"] & 0xFFFFFFFF == 0
    # IA-32e compatibility mode: EFER.LME with a code segment that has L=0, D=1.
    desc = st.machine.cs_descriptor()
    assert not desc >> 53 & 1 and desc >> 54 & 1 and desc >> 47 & 1
    assert r["efer"] & (1 << 8)
    cr0 = r["cr0"]
    assert cr0 & 1 and cr0 >> 31 & 1                      # PE, PG
    assert not cr0 >> 30 & 1 and not cr0 >> 29 & 1        # CD = NW = 0
    assert cr0 >> 5 & 1                                   # NE = 1
    assert r["cr4"] >> 14 & 1                             # SMXE
    assert not r["rflags"] >> 9 & 1                       # IF off
    # Its own GDT, IDT, stack and page tables, none of the decompressor's.
    handler = range(lay.handler, lay.handler + st.handler.header.memory_size)
    for key in ("gdt_base", "idt_base", "rsp", "cr3"):
        assert r[key] in handler, key
    assert (r["gdt_base"], r["idt_base"], r["cr3"]) != (DECOMP_GDT, DECOMP_IDT, DECOMP_PT)
    p = st.params_after()
    assert (p.status, p.reason, p.step) == (dlh.STATUS_LAUNCHING, 0, 14)


def test_getsec_capabilities_and_parameters_before_senter(st):
    leaves = [leaf for leaf, _ebx, _cr4 in st.machine.getsec_calls]
    assert leaves[0] == 0 and leaves[-1] == 4
    assert 6 in leaves
    assert all(cr4 >> 14 & 1 for _l, _b, cr4 in st.machine.getsec_calls)


def test_sinit_copied_to_txt_sinit_base(st):
    lay = Layout()
    assert st.machine.read(lay.sinit_region, len(st.acm)) == st.acm
    assert not st.params_after().out_flags & dlh.OUT_BIOS_SINIT


def test_heap_tables(st):
    lay, p = Layout(), st.params
    tables = sdg.heap_tables(st.machine.read, lay.heap)
    assert [t.size for t in tables[:3]] == [8 + 36 + 12, 8 + 96, 8 + 92 + 28 + 8]
    bios = sdg.bios_data(tables[0].body)
    assert (bios.version, bios.num_logical_procs) == (6, 4)        # untouched
    mle = sdg.os_mle_data(tables[1].body)
    assert mle == sdg.OsMleData(1, 0, lay.slrt, st.intel_info_at, lay.ap_wake,
                                lay.ap_wake_size, bytes(64))
    os = sdg.os_sinit_data(tables[2].body)
    assert (os.version, os.flags) == (7, 1)
    assert (os.mle_ptab, os.mle_size, os.mle_hdr_base) == (lay.ptab, lay.mle_end,
                                                           lay.mle_header_offset)
    assert (os.pmr_lo_base, os.pmr_lo_size, os.pmr_hi_base, os.pmr_hi_size) == (
        0, lay.pmr_lo_size, p.pmr_hi_base, p.pmr_hi_size)
    assert (os.lcp_po_base, os.lcp_po_size) == (0, 0)
    assert os.capabilities == OS_SINIT_CAPS and os.efi_rsdt_ptr == p.rsdp
    assert [(e.type, e.size) for e in os.elements] == [(8, 28), (0, 8)]
    log = sdg.event_log_pointer21(os.elements[0].data)
    assert log == sdg.EventLogPointer21(lay.event_log, lay.event_log_size, 0, 0)


def test_mle_page_tables_map_exactly_the_mle(st):
    lay = Layout()
    read = st.machine.read
    # v16 sl_find_mle_base: PDPT[0] -> PD[0] -> PT[0] is the MLE base.
    assert sdg.walk_mle_page_tables(read, lay.ptab, 0) == lay.kernel
    pages = -(-lay.mle_end // 4096)
    for linear in range(0, pages * 4096, 4096):
        assert sdg.walk_mle_page_tables(read, lay.ptab, linear + 0x123) == \
            lay.kernel + linear + 0x123
    with pytest.raises(AssertionError, match="not present"):
        sdg.walk_mle_page_tables(read, lay.ptab, pages * 4096)
    # The page tables end exactly where the MLE starts.
    assert lay.ptab + lay.ptab_size == lay.kernel


def test_dl_info_describes_the_launch(st):
    lay = Layout()
    raw = st.machine.read(st.dl_info_at, 88)
    # v16 slr_entry_dl_info offsets (patch 17/38)
    assert struct.unpack_from("<II", raw, 0) == (1, 88)
    assert struct.unpack_from("<Q", raw, 8)[0] == len(st.acm)             # dce_size
    assert struct.unpack_from("<Q", raw, 16)[0] == lay.sinit_region        # dce_base
    assert struct.unpack_from("<Q", raw, 24)[0] == lay.mle_end             # dlme_size
    assert struct.unpack_from("<Q", raw, 32)[0] == lay.kernel              # dlme_base
    assert struct.unpack_from("<Q", raw, 40)[0] == lay.mle_entry           # dlme_entry
    assert struct.unpack_from("<Q", raw, 48)[0] == lay.mle_header_offset
    assert struct.unpack_from("<Q", raw, 56)[0] == lay.zero_page           # config table
    assert struct.unpack_from("<Q", raw, 80)[0] == lay.handler + st.handler.header.entry_offset
    # and the whole table still parses
    slrt.parse(st.machine.read(lay.slrt, 4096))


def test_intel_info_holds_the_msrs_the_kernel_will_restore(st):
    lay, plat = Layout(), Platform()
    raw = st.machine.read(st.intel_info_at, 560)
    boot_params, heap, misc, def_type, vcnt = struct.unpack_from("<5Q", raw, 8)
    assert (boot_params, heap, misc, def_type, vcnt) == (
        lay.zero_page, lay.heap, plat.misc_enable, plat.mtrr_def_type, plat.mtrr_vcnt)
    pairs = struct.unpack_from("<64Q", raw, 48)
    assert pairs[:4] == (*plat.variable_mtrrs[0], *plat.variable_mtrrs[1])
    assert not any(pairs[4:])
    assert not st.params_after().out_flags & dlh.OUT_INTEL_INFO_CHANGED


def test_mtrrs_make_only_the_acm_write_back(st):
    lay, m = Layout(), st.machine
    def_type = m.msrs[MSR_DEF_TYPE]
    assert def_type & 0xFF == 0 and def_type >> 11 & 1 and not def_type >> 10 & 1
    mtrrs = [sdg.VariableMtrr(m.msrs[MSR_PHYSBASE0 + 2 * i], m.msrs[MSR_PHYSBASE0 + 2 * i + 1])
             for i in range(Platform().mtrr_vcnt)]
    valid = [v for v in mtrrs if v.valid]
    assert len(valid) == 1 and valid[0].mem_type == 6
    assert valid[0].covers(lay.sinit_region) and valid[0].covers(lay.sinit_region + 0x51F)
    assert not valid[0].covers(lay.sinit_region + 0x1000)     # at most 4 KiB - 1 beyond
    assert not valid[0].covers(lay.sinit_region - 1)
    # MTRRs were disabled (E = 0) while the variable ones were written.
    writes = [(msr, v) for msr, v in m.msr_writes if msr == MSR_DEF_TYPE or
              MSR_PHYSBASE0 <= msr < MSR_PHYSBASE0 + 64]
    assert writes[0][0] == MSR_DEF_TYPE and not writes[0][1] >> 11 & 1
    assert writes[-1] == (MSR_DEF_TYPE, def_type)


def test_tpm_localities_init_ipi_and_machine_check_banks(st):
    m = st.machine
    assert [w for w in m.mmio_writes if w[0] == "tpm"] == [("tpm", 0x0, 1, 0x20)]
    assert not m.p.tpm_access[0] & 0x20
    assert m.ipis == [("xapic", 0, 0x000C4500)]        # INIT, assert, all excluding self
    assert (0x405, 0) in m.msr_writes and not m.msrs[0x405] >> 63
    assert not [w for w in m.mmio_writes if w[0].startswith("txt")]
    assert m.ports == []


def test_x2apic_sends_init_through_the_icr_msr():
    st = run(Scenario(platform=Platform(apic_base=0xFEE00000 | (1 << 11) | (1 << 10) |
                                        (1 << 8))))
    assert st.outcome.kind == "senter", st.outcome.detail
    assert st.machine.ipis == [("x2apic", 0, 0x000C4500)]
    assert not [w for w in st.machine.mmio_writes if w[0] == "apic"]


@pytest.mark.parametrize("bios_date, used", [(0x20260101, "bios"), (0x20200101, "ours")])
def test_bios_sinit_used_when_at_least_as_new(bios_date, used):
    bios = matching_acm(date=bios_date, pad=0x100)
    st = run(Scenario(bios_acm=bios))
    assert st.outcome.kind == "senter", st.outcome.detail
    lay = Layout()
    want = bios if used == "bios" else st.acm
    assert st.outcome.regs["rcx"] & 0xFFFFFFFF == len(want)
    assert st.machine.read(lay.sinit_region, len(want)) == want
    assert bool(st.params_after().out_flags & dlh.OUT_BIOS_SINIT) == (used == "bios")


def test_bios_sinit_for_another_chipset_is_ignored():
    st = run(Scenario(bios_acm=matching_acm(did=0x4660, date=0x20300101)))
    assert st.outcome.kind == "senter", st.outcome.detail
    assert st.machine.read(Layout().sinit_region, len(st.acm)) == st.acm


def test_intel_info_follows_the_cpu_when_it_changed_since_staging():
    plat = Platform()
    lay = Layout()
    staged = slrt.IntelInfo(txt_heap=0, saved_misc_enable=0x1, default_mem_type=0x6,
                            variable_mtrrs=(slrt.MtrrPair(6, 0xF000000800),),
                            boot_params_addr=lay.zero_page)
    st = run(Scenario(platform=plat, staged_intel_info=staged))
    assert st.outcome.kind == "senter", st.outcome.detail
    raw = st.machine.read(st.intel_info_at, 560)
    assert struct.unpack_from("<3Q", raw, 24) == (plat.misc_enable, plat.mtrr_def_type,
                                                  plat.mtrr_vcnt)
    assert st.params_after().out_flags & dlh.OUT_INTEL_INFO_CHANGED


def test_five_level_paging_caller():
    """CR4.LA57 cannot change in long mode: the handler's own map gets a PML5 on top."""
    st = run(Scenario(la57=True))
    assert st.outcome.kind == "senter", st.outcome.detail
    assert st.outcome.regs["cr4"] >> 12 & 1


# ---------------------------------------------------------------- failure paths

NEGATIVE = {
    "txt-reset-pending": (lambda sc: sc.platform.txt.update({0x008: 1}), 5),
    "no-smx": (lambda sc: setattr(sc.platform, "smx", False), 3),
    "heap-too-small": (lambda sc: setattr(sc.layout, "heap_size", 0x100), 11),
    "bad-mle-header": (lambda sc: setattr(sc, "mle_header", b"\0" * 52), 13),
    "senter-already-done": (lambda sc: sc.platform.txt.update({0x000: 0x3}), 7),
}


def negative(name: str, require_drtm: bool) -> Scenario:
    sc = Scenario(require_drtm=require_drtm)
    NEGATIVE[name][0](sc)
    return sc


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_failed_check_returns_to_the_decompressor_intact(name):
    st = run(negative(name, False))
    r, m = st.outcome.regs, st.machine
    assert st.outcome.kind == "returned", st.outcome.detail
    p = st.params_after()
    assert (p.status, p.reason) == (dlh.STATUS_RETURNED, NEGATIVE[name][1])
    # SysV: callee-saved registers and the stack as the caller left them; and the
    # decompressor's GDT, CS, data segments, IDT, page tables and RFLAGS.IF back.
    for reg_name, (_reg, value) in CALLEE_SAVED.items():
        assert r[reg_name] == value, reg_name
    assert r["rsp"] == m.caller_rsp + 8
    assert (r["cs"], r["ss"], r["ds"]) == (DECOMP_CS, DECOMP_DS, DECOMP_DS)
    assert (r["gdt_base"], r["idt_base"], r["cr3"]) == (DECOMP_GDT, DECOMP_IDT, DECOMP_PT)
    assert r["rflags"] & 0x200 == CALLER_RFLAGS & 0x200
    assert not r["cr4"] >> 14 & 1                     # SMXE as it was
    assert m.ports == [] and not [w for w in m.mmio_writes if w[0].startswith("txt")]
    assert not [msr for msr, _ in m.msr_writes if msr == MSR_DEF_TYPE]


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_failed_check_with_require_drtm_resets(name):
    st = run(negative(name, True))
    m = st.machine
    assert st.outcome.kind == "reset", st.outcome.detail
    p = st.params_after()
    assert (p.status, p.reason) == (dlh.STATUS_RESETTING, NEGATIVE[name][1])
    # Before a launch the TXT private space is closed: the reset is port 0xCF9's.
    assert m.ports == [(0xCF9, 0x02), (0xCF9, 0x0E)]
    assert not [w for w in m.mmio_writes if w[0] == "txt-priv"]


def test_reset_leaves_the_reason_in_txt_errorcode_when_the_private_space_is_open():
    sc = negative("txt-reset-pending", True)
    sc.platform.txt[0x000] = 0x80                     # PRIVATE-OPEN, no SENTER.DONE
    st = run(sc)
    m = st.machine
    assert st.outcome.kind == "reset" and st.outcome.detail == "TXT.CMD.RESET"
    landed = [off & ~7 for kind, off, _s, _v in m.mmio_writes if kind == "txt-priv"]
    # ERRORCODE, UNLOCK-MEM-CONFIG, CMD.RESET, in that order (v16 sl_txt_reset)
    assert sorted(set(landed), key=landed.index) == [0x030, 0x218, 0x038]
    assert m.txt_priv_regs[0x030] == 0xC000C005 and m.txt_priv_regs[0x038] == 1
    # What the next boot's `relaunchctl check` and proof read back:
    reason = dlh.reason_from_errorcode(m.txt[0x030])
    assert reason is not None and reason.id == "dl-handler-txt-reset-pending"
    assert "DL handler" in txt_registers.decode_errorcode(m.txt[0x030]).text


@pytest.mark.parametrize("platform, reason", [
    (Platform(tpm_stuck=True), 23),
    (Platform(mc_status={0: 1 << 63}, mc_status_sticky=True), 21),
])
def test_failure_after_the_mtrrs_changed_restores_them(platform, reason):
    st = run(Scenario(platform=platform))
    m, plat = st.machine, Platform()
    assert st.outcome.kind == "returned", st.outcome.detail
    assert st.params_after().reason == reason
    assert m.msrs[MSR_DEF_TYPE] == plat.mtrr_def_type
    for i in range(plat.mtrr_vcnt):
        want = plat.variable_mtrrs[i] if i < len(plat.variable_mtrrs) else (0, 0)
        assert (m.msrs[MSR_PHYSBASE0 + 2 * i], m.msrs[MSR_PHYSBASE0 + 2 * i + 1]) == want


@pytest.mark.parametrize("change, reason", [
    ({"os_sinit_caps": OS_SINIT_CAPS | 1 << 3}, 26),               # STM: not in this SINIT
    ({"kernel_base": Layout().kernel + 0x200000}, 15),             # dlme_base elsewhere
    ({"mle_ptab_size": 0x1000, "mle_ptab": Layout().kernel - 0x1000}, 16),
    ({"pmr_lo_size": 0x0100_0000}, 17),                            # MLE beyond the low PMR
    ({"ap_wake_block": Layout().kernel + 0x1000}, 15),             # wake block inside MLE
    ({"sinit": 0, "sinit_size": 0}, 18),
])
def test_layout_checks(change, reason):
    st = run(Scenario(params_override=change))
    assert st.outcome.kind == "returned", st.outcome.detail
    assert st.params_after().reason == reason


def test_mle_header_fields_are_checked():
    lay = Layout()
    for bad in ({"version": 0x00010000}, {"start": 0x1000}, {"end": lay.kernel_size + 4096},
                {"entry_point": lay.mle_end}, {"capabilities": 0x1}):
        st = run(Scenario(mle_header=v16_mle_header(lay, **bad)))
        assert st.outcome.kind == "returned", (bad, st.outcome.detail)
        assert st.params_after().reason in (13, 14), bad


def test_cpu_count_and_bios_data_version():
    st = run(Scenario(num_logical_procs=513))
    assert st.params_after().reason == 10
    st = run(Scenario(bios_data_version=4))
    assert st.params_after().reason == 9


def test_foreign_context_is_refused():
    sc = Scenario()
    st = run(dataclasses.replace(sc, params_override={"dl_info": 0x1234}))
    assert st.outcome.kind == "returned" and st.params_after().reason == 1
