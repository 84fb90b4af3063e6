"""An emulated Intel TXT machine that runs the built DL handler from the state the
Secure Launch v16 decompressor calls it in, up to GETSEC[SENTER] (PyPI unicorn).

What is emulated (each modelled from its published interface, not from the
handler's code):
  * the CPU: unicorn's x86-64 (QEMU TCG). The decompressor's state is set up as
    v16 patch 38 leaves it: 64-bit mode, its own GDT (code 0x18, data 0x20 here,
    unlike the handler's), IDT and identity page tables, `dlme` on its stack,
    RDI = &DL_INFO.bl_context, RSI = &dlme, a return address to come back to;
  * RDMSR/WRMSR and GETSEC (not modelled by unicorn): trapped before they execute
    and served from `Platform` (MTRRs, MISC_ENABLE, IA32_FEATURE_CONTROL,
    IA32_APIC_BASE, MCG/MC banks, x2APIC ICR; GETSEC[CAPABILITIES] and
    [PARAMETERS], SDM vol. 2D 7.3). GETSEC[SENTER] itself is left to execute:
    unicorn stops on it (UC_ERR_INSN_INVALID) with every register intact;
  * CPUID leaf 1 (FMS, SMX bit);
  * TXT public and private configuration space (SDG Appendix B): 64-bit registers;
    the private space takes writes only while TXT.STS.PRIVATE-OPEN is set;
  * TPM TIS localities 0-4 (TCG PTP ACCESS register: writing activeLocality
    relinquishes it; windows of localities 2-4 are closed before a launch);
  * the local APIC's ICR (xAPIC MMIO at IA32_APIC_BASE), port 0xCF9.
Unicorn quirks (dl-handler.md "Emulation"): the invalid-instruction hook does not
fire, so GETSEC[SENTER] is recognised from the UcError and the bytes at RIP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_DS,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_GDTR,
    UC_X86_REG_IDTR,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
    UC_X86_REG_SS,
)

TXT_PRIV = 0xFED20000
TXT_PUB = 0xFED30000
TPM_BASE = 0xFED40000
APIC_DEFAULT = 0xFEE00000
MSR_EFER = 0xC0000080

# The decompressor's side of the machine (below the handler's world).
DECOMP_PT = 0x00010000      # identity page tables, 4-level, 2 MiB pages
DECOMP_GDT = 0x00020000
DECOMP_IDT = 0x00021000
DECOMP_TRAP = 0x00022000    # every decompressor IDT vector lands here
RETURN_LANDING = 0x00023000
DECOMP_STACK_TOP = 0x00030000
DECOMP_CS, DECOMP_DS = 0x18, 0x20
# SysV callee-saved registers: name -> (unicorn register, the caller's value)
CALLEE_SAVED = {"rbx": (UC_X86_REG_RBX, 0x1111111111111111),
                "rbp": (UC_X86_REG_RBP, 0x2222222222222222),
                "r12": (UC_X86_REG_R12, 0x3333333333333333),
                "r13": (UC_X86_REG_R13, 0x4444444444444444),
                "r14": (UC_X86_REG_R14, 0x5555555555555555),
                "r15": (UC_X86_REG_R15, 0x6666666666666666)}
CALLER_RFLAGS = 0x202        # IF set: the handler must clear it and give it back


@dataclass
class Platform:
    """The machine's registers and devices. Defaults: a TXT-ready server."""

    smx: bool = True
    fms: int = 0x000806F8
    platform_id: int = 0
    apic_base: int = APIC_DEFAULT | (1 << 11) | (1 << 8)     # enabled, BSP, xAPIC
    feature_control: int = 0xFF07
    misc_enable: int = 0x850089
    mtrr_vcnt: int = 10
    mtrr_def_type: int = 0xC06
    variable_mtrrs: list[tuple[int, int]] = field(default_factory=lambda: [
        (0x0000000006, 0xFF80000800),          # 0-2 GiB WB (39-bit mask)
        (0x0080000000, 0xFFC0000800),          # 2-3 GiB WB
    ])
    mcg_cap: int = 4
    mcg_status: int = 0
    mc_status: dict[int, int] = field(default_factory=dict)
    mc_status_sticky: bool = False           # a bank that cannot be cleared
    getsec_caps: int = 0x000001FD            # chipset, ENTERACCS..WAKEUP (SDM Table 7-3)
    getsec_params: list[tuple[int, int, int]] = field(default_factory=lambda: [
        (0x00000001, 0x00000000, 0x00000001),  # type 1: ACM versions
        (0x00400002, 0, 0),                     # type 2: max ACM size 4 MiB (EAX[31:5]*32)
        (0x00000103, 0, 0),                     # type 3: ACM memory types (WB)
        (0x00000005, 0, 0),                     # type 5: TXT extensions, none
    ])
    txt: dict[int, int] = field(default_factory=dict)         # public space offset -> value
    tpm_access: list[int] = field(default_factory=lambda: [0xA1, 0xFF, 0xFF, 0xFF, 0xFF])
    tpm_stuck: bool = False                  # locality 0 ignores relinquish


@dataclass
class Outcome:
    kind: str                    # "senter" | "returned" | "reset" | "fault"
    detail: str
    regs: dict[str, int]


class TxtMachine:
    def __init__(self, platform: Platform, *, ram: int = 256 << 20,
                 la57: bool = False) -> None:
        self.p = platform
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map(0, ram)
        self.msr_writes: list[tuple[int, int]] = []
        self.msr_reads: list[int] = []
        self.msrs: dict[int, int] = {}
        self.mmio_writes: list[tuple[str, int, int, int]] = []
        self.ports: list[tuple[int, int]] = []
        self.getsec_calls: list[tuple[int, int, int]] = []   # (leaf, ebx, cr4)
        self.ipis: list[tuple[str, int, int]] = []
        self.icr_hi = 0
        self.outcome: Outcome | None = None
        self._stop: tuple[str, str] | None = None
        self._code: tuple[int, int] = (0, 0)
        self._init_msrs()
        self._init_devices()
        self._init_decompressor(la57)

    # ------------------------------------------------------------ set-up
    def _init_msrs(self) -> None:
        p = self.p
        m = self.msrs
        m[0x17] = p.platform_id
        m[0x1B] = p.apic_base
        m[0x3A] = p.feature_control
        m[0xFE] = 0x500 | p.mtrr_vcnt
        m[0x179] = p.mcg_cap
        m[0x17A] = p.mcg_status
        m[0x1A0] = p.misc_enable
        m[0x2FF] = p.mtrr_def_type
        for i in range(p.mtrr_vcnt):
            base, mask = p.variable_mtrrs[i] if i < len(p.variable_mtrrs) else (0, 0)
            m[0x200 + 2 * i], m[0x201 + 2 * i] = base, mask
        for i in range(p.mcg_cap & 0xFF):
            m[0x401 + 4 * i] = p.mc_status.get(i, 0)
        m[0x830] = 0

    def _init_devices(self) -> None:
        uc = self.uc
        txt = {0x000: 0x2, 0x008: 0, 0x030: 0, 0x110: 0x00000001B0058086,
               0x200: 0x80000000, 0x8F0: 0}
        txt.update(self.p.txt)
        self.txt = txt
        self.txt_priv_regs: dict[int, int] = {}
        uc.mmio_map(TXT_PUB, 0x10000, self._txt_pub_read, None, self._txt_pub_write, None)
        uc.mmio_map(TXT_PRIV, 0x10000, self._txt_priv_read, None, self._txt_priv_write, None)
        uc.mmio_map(TPM_BASE, 0x5000, self._tpm_read, None, self._tpm_write, None)
        apic = self.p.apic_base & 0xFFFFFF000
        uc.mmio_map(apic, 0x1000, self._apic_read, None, self._apic_write, None)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._cpuid, None, 1, 0, UC_X86_INS_CPUID)

    def _init_decompressor(self, la57: bool) -> None:
        uc = self.uc
        top = DECOMP_PT
        if la57:
            uc.mem_write(top, struct.pack("<Q", (DECOMP_PT + 0x1000) | 3))
            top += 0x1000
        pml4, pdpt, pd = top, top + 0x1000, top + 0x2000
        uc.mem_write(pml4, struct.pack("<Q", pdpt | 3))
        for i in range(4):
            uc.mem_write(pdpt + 8 * i, struct.pack("<Q", (pd + 0x1000 * i) | 3))
            uc.mem_write(pd + 0x1000 * i, b"".join(
                struct.pack("<Q", ((i * 512 + j) << 21) | 0x83) for j in range(512)))
        gdt = struct.pack("<5Q", 0, 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
        uc.mem_write(DECOMP_GDT, gdt)
        gates = b""
        for _ in range(32):
            t = DECOMP_TRAP
            gates += struct.pack("<HHBBHII", t & 0xFFFF, DECOMP_CS, 0, 0x8E, (t >> 16) & 0xFFFF,
                                 t >> 32, 0)
        uc.mem_write(DECOMP_IDT, gates)
        uc.mem_write(DECOMP_TRAP, b"\xf4")          # hlt
        uc.mem_write(RETURN_LANDING, b"\xf4")
        uc.reg_write(UC_X86_REG_GDTR, (0, DECOMP_GDT, len(gdt) - 1, 0))
        uc.reg_write(UC_X86_REG_IDTR, (0, DECOMP_IDT, len(gates) - 1, 0))
        uc.reg_write(UC_X86_REG_CR3, DECOMP_PT)
        uc.reg_write(UC_X86_REG_CR4, 0x20 | (0x1000 if la57 else 0))     # PAE (+LA57)
        uc.msr_write(MSR_EFER, 0x500)                                   # LME, LMA
        uc.reg_write(UC_X86_REG_CR0, 0x80050033)                       # PG WP NE ET MP PE
        uc.reg_write(UC_X86_REG_CS, DECOMP_CS)
        for reg in (UC_X86_REG_SS, UC_X86_REG_DS):
            uc.reg_write(reg, DECOMP_DS)

    def load(self, address: int, data: bytes) -> None:
        self.uc.mem_write(address, data)

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(address, size))

    # ------------------------------------------------------------ devices
    def _txt_pub_read(self, uc: Uc, offset: int, size: int, _ud: Any) -> int:
        reg = offset & ~7
        return (self.txt.get(reg, 0) >> (8 * (offset - reg))) & ((1 << (8 * size)) - 1)

    def _txt_pub_write(self, uc: Uc, offset: int, size: int, value: int, _ud: Any) -> None:
        self.mmio_writes.append(("txt-pub", offset, size, value))   # read-only: ignored

    def _private_open(self) -> bool:
        return bool(self.txt.get(0, 0) & (1 << 7))

    def _txt_priv_read(self, uc: Uc, offset: int, size: int, _ud: Any) -> int:
        if not self._private_open():
            return (1 << (8 * size)) - 1
        return self._txt_pub_read(uc, offset, size, _ud)

    def _txt_priv_write(self, uc: Uc, offset: int, size: int, value: int, _ud: Any) -> None:
        # 64-bit registers; the emulator may split an 8-byte store into two 4-byte ones.
        landed = self._private_open()
        self.mmio_writes.append(("txt-priv" if landed else "txt-priv-dropped", offset, size,
                                 value))
        if not landed:
            return
        reg, shift = offset & ~7, 8 * (offset & 7)
        mask = ((1 << (8 * size)) - 1) << shift
        self.txt_priv_regs[reg] = (self.txt_priv_regs.get(reg, 0) & ~mask) | (value << shift)
        if reg == 0x30:
            self.txt[0x30] = self.txt_priv_regs[reg] & 0xFFFFFFFF
        if reg == 0x38 and shift == 0:
            self._stop = ("reset", "TXT.CMD.RESET")
            uc.emu_stop()

    def _tpm_read(self, uc: Uc, offset: int, size: int, _ud: Any) -> int:
        loc, reg = divmod(offset, 0x1000)
        if reg == 0 and size == 1:
            return self.p.tpm_access[loc]
        return 0xFF if loc >= 2 else 0

    def _tpm_write(self, uc: Uc, offset: int, size: int, value: int, _ud: Any) -> None:
        loc, reg = divmod(offset, 0x1000)
        self.mmio_writes.append(("tpm", offset, size, value))
        access = self.p.tpm_access[loc]
        if reg == 0 and value & 0x20 and access != 0xFF and not self.p.tpm_stuck:
            self.p.tpm_access[loc] = access & ~0x20

    def _apic_read(self, uc: Uc, offset: int, size: int, _ud: Any) -> int:
        return self.icr_hi if offset == 0x310 else 0     # delivery status always idle

    def _apic_write(self, uc: Uc, offset: int, size: int, value: int, _ud: Any) -> None:
        self.mmio_writes.append(("apic", offset, size, value))
        if offset == 0x310:
            self.icr_hi = value
        elif offset == 0x300:
            self.ipis.append(("xapic", self.icr_hi, value))

    def _out(self, uc: Uc, port: int, size: int, value: int, _ud: Any) -> None:
        self.ports.append((port, value))
        if port == 0xCF9 and value & 0x4:
            self._stop = ("reset", f"port 0xCF9 <- {value:#x}")
            uc.emu_stop()

    def _cpuid(self, uc: Uc, _ud: Any) -> int:
        leaf = uc.reg_read(UC_X86_REG_RAX) & 0xFFFFFFFF
        eax = ebx = ecx = edx = 0
        if leaf == 1:
            eax, ecx = self.p.fms, (1 << 6) if self.p.smx else 0
        for reg, v in ((UC_X86_REG_RAX, eax), (UC_X86_REG_RBX, ebx), (UC_X86_REG_RCX, ecx),
                       (UC_X86_REG_RDX, edx)):
            uc.reg_write(reg, v)
        return 1

    # ------------------------------------------------------------ trapped instructions
    def _code_hook(self, uc: Uc, address: int, size: int, _ud: Any) -> None:
        if address == DECOMP_TRAP:
            self._stop = ("fault", "exception delivered through the decompressor's IDT")
            uc.emu_stop()
            return
        if size != 2:
            return
        op = bytes(uc.mem_read(address, 2))
        if op == b"\x0f\x32":                              # rdmsr
            msr = uc.reg_read(UC_X86_REG_RCX) & 0xFFFFFFFF
            self.msr_reads.append(msr)
            if msr not in self.msrs:
                self._stop = ("fault", f"rdmsr of unmodelled MSR {msr:#x}")
                uc.emu_stop()
                return
            v = self.msrs[msr]
            uc.reg_write(UC_X86_REG_RAX, v & 0xFFFFFFFF)
            uc.reg_write(UC_X86_REG_RDX, v >> 32)
            uc.reg_write(UC_X86_REG_RIP, address + 2)
        elif op == b"\x0f\x30":                            # wrmsr
            msr = uc.reg_read(UC_X86_REG_RCX) & 0xFFFFFFFF
            v = (uc.reg_read(UC_X86_REG_RDX) & 0xFFFFFFFF) << 32 | (
                uc.reg_read(UC_X86_REG_RAX) & 0xFFFFFFFF)
            self.msr_writes.append((msr, v))
            if msr not in self.msrs:
                self._stop = ("fault", f"wrmsr of unmodelled MSR {msr:#x}")
                uc.emu_stop()
                return
            if 0x401 <= msr < 0x401 + 4 * (self.p.mcg_cap & 0xFF) and self.p.mc_status_sticky:
                pass
            else:
                self.msrs[msr] = v
            if msr == 0x830:
                self.ipis.append(("x2apic", v >> 32, v & 0xFFFFFFFF))
            uc.reg_write(UC_X86_REG_RIP, address + 2)

    def _getsec(self, address: int) -> bool:
        """Serve GETSEC[CAPABILITIES] and [PARAMETERS] (unicorn raises #UD on any GETSEC,
        before a code hook sees it); False for the leaves that end the run."""
        uc = self.uc
        leaf = uc.reg_read(UC_X86_REG_RAX) & 0xFFFFFFFF
        ebx = uc.reg_read(UC_X86_REG_RBX) & 0xFFFFFFFF
        cr4 = uc.reg_read(UC_X86_REG_CR4)
        self.getsec_calls.append((leaf, ebx, cr4))
        if leaf not in (0, 6) or not cr4 & (1 << 14):
            return False
        if leaf == 0:
            uc.reg_write(UC_X86_REG_RAX, self.p.getsec_caps if ebx == 0 else 0)
        else:
            params = self.p.getsec_params
            eax, rbx, rcx = params[ebx] if ebx < len(params) else (0, ebx, 0)
            uc.reg_write(UC_X86_REG_RAX, eax)
            uc.reg_write(UC_X86_REG_RBX, rbx)
            uc.reg_write(UC_X86_REG_RCX, rcx)
        uc.reg_write(UC_X86_REG_RIP, address + 2)
        return True

    # ------------------------------------------------------------ running
    def call(self, entry: int, code: tuple[int, int], bl_context: int,
             dlme: tuple[int, int, int], *, limit: int = 20_000_000) -> Outcome:
        """dl_launch(&bl_context, &dlme) as the decompressor makes it."""
        uc = self.uc
        self._code = code
        sp = DECOMP_STACK_TOP - 0x100
        dlme_at = sp + 0x20                 # a local of the caller, above its call frame
        uc.mem_write(dlme_at, struct.pack("<QQQ", *dlme))
        uc.mem_write(sp, struct.pack("<Q", RETURN_LANDING))
        uc.reg_write(UC_X86_REG_RSP, sp)
        uc.reg_write(UC_X86_REG_RDI, bl_context)
        uc.reg_write(UC_X86_REG_RSI, dlme_at)
        for reg, v in CALLEE_SAVED.values():
            uc.reg_write(reg, v)
        uc.reg_write(UC_X86_REG_EFLAGS, CALLER_RFLAGS)
        self.caller_rsp = sp
        uc.hook_add(UC_HOOK_CODE, self._code_hook, None, code[0], code[1])
        uc.hook_add(UC_HOOK_CODE, self._code_hook, None, DECOMP_TRAP, DECOMP_TRAP)
        pc = entry
        while True:
            try:
                uc.emu_start(pc, RETURN_LANDING, count=limit)
            except UcError as e:
                rip = uc.reg_read(UC_X86_REG_RIP)
                op = bytes(uc.mem_read(rip, 2))
                if op == b"\x0f\x37" and self._getsec(rip):
                    pc = rip + 2
                    continue
                leaf = uc.reg_read(UC_X86_REG_RAX) & 0xFFFFFFFF
                smxe = bool(uc.reg_read(UC_X86_REG_CR4) & (1 << 14))
                if op == b"\x0f\x37" and leaf == 4 and smxe:
                    kind, detail = "senter", f"GETSEC[SENTER] at {rip:#x}"
                elif op == b"\x0f\x37":
                    kind, detail = "fault", (f"GETSEC leaf {leaf} with CR4.SMXE "
                                             f"{'set' if smxe else 'clear (#UD on hardware)'}")
                else:
                    kind, detail = "fault", f"{e} at {rip:#x} ({op.hex()})"
                break
            if self._stop:
                kind, detail = self._stop
            elif uc.reg_read(UC_X86_REG_RIP) == RETURN_LANDING:
                kind, detail = "returned", "returned to the decompressor"
            else:
                kind, detail = "fault", f"stopped at {uc.reg_read(UC_X86_REG_RIP):#x}"
            break
        self.outcome = Outcome(kind, detail, self.registers())
        return self.outcome

    def registers(self) -> dict[str, int]:
        uc = self.uc
        names = {"rax": UC_X86_REG_RAX, "rbx": UC_X86_REG_RBX, "rcx": UC_X86_REG_RCX,
                 "rdx": UC_X86_REG_RDX, "rsi": UC_X86_REG_RSI, "rdi": UC_X86_REG_RDI,
                 "rsp": UC_X86_REG_RSP, "rbp": UC_X86_REG_RBP, "r12": UC_X86_REG_R12,
                 "r13": UC_X86_REG_R13, "r14": UC_X86_REG_R14, "r15": UC_X86_REG_R15,
                 "rip": UC_X86_REG_RIP, "rflags": UC_X86_REG_EFLAGS, "cr0": UC_X86_REG_CR0,
                 "cr3": UC_X86_REG_CR3, "cr4": UC_X86_REG_CR4, "cs": UC_X86_REG_CS,
                 "ss": UC_X86_REG_SS, "ds": UC_X86_REG_DS}
        out = {k: uc.reg_read(v) for k, v in names.items()}
        out["efer"] = uc.msr_read(MSR_EFER)
        gdtr = uc.reg_read(UC_X86_REG_GDTR)
        idtr = uc.reg_read(UC_X86_REG_IDTR)
        out["gdt_base"], out["gdt_limit"] = gdtr[1], gdtr[2]
        out["idt_base"], out["idt_limit"] = idtr[1], idtr[2]
        return out

    def cs_descriptor(self) -> int:
        """The GDT descriptor CS selects now (to tell 64-bit from compatibility mode)."""
        r = self.registers()
        return struct.unpack("<Q", self.read(r["gdt_base"] + (r["cs"] & ~7), 8))[0]
