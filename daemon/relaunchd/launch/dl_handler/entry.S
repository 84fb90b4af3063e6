/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * entry.S - how relaunchd's TXT DL handler is entered and left.
 *
 * Entry (v16 patch 38/38, arch/x86/boot/compressed/misc.c sl_initiate_launch):
 * the decompressor calls DL_INFO.dl_launch(&DL_INFO.bl_context, &dlme) as a
 * SysV function in 64-bit mode, CPL 0, on its own GDT, IDT and on-demand
 * identity map, with `dlme` on its stack. If the call returns, the kernel
 * boots on unmeasured.
 *
 * dl_launch saves everything a SysV callee must keep plus the CPU state it is
 * about to change, copies `dlme` off the caller's stack, takes its own stack,
 * builds its own identity map of the low 4 GiB (while the decompressor's #PF
 * handler can still map our pages on demand), then loads its own page tables,
 * GDT and IDT and runs rld_main (handler.c) with interrupts off.
 *
 * rld_main either ends in rld_senter (never returns) or fails; rld_fail then
 * reports, and either resets the platform (require_drtm) or restores the
 * caller's GDT, CS, IDT, CR3, CR4, CR0, stack, callee-saved registers and
 * RFLAGS and returns to the decompressor.
 *
 * Position independent: every reference is RIP-relative; descriptor bases are
 * filled in at run time. The build refuses any run-time relocation (handler.lds).
 */
#include "abi.h"

#define GDT_CS32        0x08    /* 32-bit code: compatibility mode for SENTER */
#define GDT_CS64        0x10
#define GDT_DS          0x18

/* offsets in `saved` */
#define S_RBX           0
#define S_RBP           8
#define S_R12           16
#define S_R13           24
#define S_R14           32
#define S_R15           40
#define S_RSP           48
#define S_RFLAGS        56
#define S_CR0           64
#define S_CR3           72
#define S_CR4           80
#define S_CS            88
#define S_SS            90
#define S_DS            92
#define S_ES            94
#define S_GDTR          96      /* 10 bytes */
#define S_IDTR          112     /* 10 bytes */
#define S_SIZE          128

	.section .header, "a"
	.globl	rld_header
rld_header:
	.ascii	"RLDTXTDL"
	.long	RLD_DL_ABI_VERSION
	.long	RLD_DL_HEADER_SIZE
	.long	dl_launch - rld_header
	.long	__image_end - rld_header
	.long	__memory_end - rld_header
	.long	rld_params - rld_header
	.long	RLD_PARAMS_SIZE
	.long	RLD_DL_SLRT_LAYOUT
	.long	RLD_DL_ALIGN
	.fill	5, 4, 0

	.text
	.code64
	.globl	dl_launch
	.type	dl_launch, @function
dl_launch:
	pushfq				/* the caller's RFLAGS, IF included */
	cli
	leaq	saved(%rip), %rax
	popq	S_RFLAGS(%rax)
	movq	%rbx, S_RBX(%rax)
	movq	%rbp, S_RBP(%rax)
	movq	%r12, S_R12(%rax)
	movq	%r13, S_R13(%rax)
	movq	%r14, S_R14(%rax)
	movq	%r15, S_R15(%rax)
	movq	%rsp, S_RSP(%rax)
	movq	%cr0, %rcx
	movq	%rcx, S_CR0(%rax)
	movq	%cr3, %rcx
	movq	%rcx, S_CR3(%rax)
	movq	%cr4, %rcx
	movq	%rcx, S_CR4(%rax)
	movw	%cs, S_CS(%rax)
	movw	%ss, S_SS(%rax)
	movw	%ds, S_DS(%rax)
	movw	%es, S_ES(%rax)
	sgdt	S_GDTR(%rax)
	sidt	S_IDTR(%rax)
	cld

	/* `dlme` lives on the decompressor's stack: copy it before leaving that stack. */
	leaq	dlme_copy(%rip), %r13
	movq	(%rsi), %rcx
	movq	%rcx, (%r13)
	movq	8(%rsi), %rcx
	movq	%rcx, 8(%r13)
	movq	16(%rsi), %rcx
	movq	%rcx, 16(%r13)
	movq	%rdi, %r12		/* &DL_INFO.bl_context */

	leaq	stack_top(%rip), %rsp
	movq	%cr4, %rdi
	call	rld_build_identity_map	/* returns the top-level table */
	movq	%rax, %cr3

	leaq	gdt(%rip), %rax
	movq	%rax, gdt_desc+2(%rip)
	lgdt	gdt_desc(%rip)
	leaq	1f(%rip), %rax
	pushq	$GDT_CS64
	pushq	%rax
	lretq
1:	movw	$GDT_DS, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss

	leaq	exception_stubs(%rip), %rdi
	call	rld_build_idt		/* returns the IDT base */
	movq	%rax, idt_desc+2(%rip)
	lidt	idt_desc(%rip)

	movq	%r12, %rdi
	movq	%r13, %rsi
	call	rld_main		/* returns only when a check failed: reason in eax */
	movl	%eax, %edi
	xorl	%esi, %esi
	jmp	rld_fail
	.size	dl_launch, . - dl_launch

/*
 * rld_fail(reason, detail): the failure path. Takes a fresh stack (an exception
 * may have left anything on the old one), lets rld_failed (handler.c) report,
 * undo the MTRRs and decide; returns to the decompressor only when rld_failed
 * returns (require_drtm unset).
 */
	.globl	rld_fail
	.type	rld_fail, @function
rld_fail:
	cli
	leaq	stack_top(%rip), %rsp
	call	rld_failed

	leaq	saved(%rip), %rbx
	movq	S_RSP(%rbx), %rsp	/* the caller's stack: mapped in both address spaces */
	lgdt	S_GDTR(%rbx)
	leaq	2f(%rip), %rax
	movzwq	S_CS(%rbx), %rcx
	pushq	%rcx
	pushq	%rax
	lretq
2:	movw	S_SS(%rbx), %ss
	movw	S_DS(%rbx), %ds
	movw	S_ES(%rbx), %es
	/*
	 * The caller's IDT before its CR3: from here on a page of ours that its
	 * on-demand map lacks faults into its own #PF handler, which maps it.
	 */
	lidt	S_IDTR(%rbx)
	movq	S_CR3(%rbx), %rax
	movq	%rax, %cr3
	movq	S_CR4(%rbx), %rax
	movq	%rax, %cr4
	movq	S_CR0(%rbx), %rax
	movq	%rax, %cr0
	movq	%rbx, %rax
	movq	S_RBP(%rax), %rbp
	movq	S_R12(%rax), %r12
	movq	S_R13(%rax), %r13
	movq	S_R14(%rax), %r14
	movq	S_R15(%rax), %r15
	pushq	S_RFLAGS(%rax)
	movq	S_RBX(%rax), %rbx
	popfq
	ret
	.size	rld_fail, . - rld_fail

/*
 * Exception vectors 0-31 all land here with their number: any fault while the
 * handler runs (including a #GP from GETSEC itself) is a failed check.
 */
	.p2align 4
	.globl	exception_stubs
exception_stubs:
	.set	vector, 0
	.rept	32
	.p2align 4
	movl	$vector, %esi
	jmp	exception_common
	.set	vector, vector + 1
	.endr
exception_common:
	movl	$RLD_REASON_EXCEPTION, %edi
	jmp	rld_fail

/*
 * rld_senter(sinit_base, sinit_size): the last step. Far return into the 32-bit
 * code segment (IA-32e compatibility mode, paging stays on over our identity
 * map), then GETSEC[SENTER] with EAX = 4, EBX = SINIT base, ECX = SINIT size,
 * EDX = 0. SDM vol. 2D 7.3 GETSEC[SENTER]: "Execution is not allowed unless the
 * processor is in protected mode or IA-32e mode with CPL = 0 and EFLAGS.VM = 0";
 * cache enabled (CR0.CD = CR0.NW = 0) and CR0.NE = 1 are set by handler.c
 * before this call; EDX = 0 asks for the full functionality. GRUB's EFI path
 * (TrenchBoot x86_dltrampoline.S) launches from compatibility mode the same way.
 * SINIT takes the CPU; control comes back, if at all, at the MLE entry point.
 */
	.globl	rld_senter
	.type	rld_senter, @function
rld_senter:
	movl	%edi, %ebx		/* compatibility mode has no r8-r15: load EBX/ECX here */
	movl	%esi, %ecx
	leaq	3f(%rip), %rax
	pushq	$GDT_CS32
	pushq	%rax
	lretq
	.code32
3:	movl	$4, %eax		/* GETSEC leaf SENTER */
	xorl	%edx, %edx
	.byte	0x0f, 0x37		/* getsec */
	ud2				/* not reached: SENTER does not return */
	.code64
	.size	rld_senter, . - rld_senter

/* ---- privileged single instructions, called from handler.c ---- */
	.globl	rld_rdmsr
rld_rdmsr:				/* u64 rld_rdmsr(u32 msr) */
	movl	%edi, %ecx
	rdmsr
	shlq	$32, %rdx
	orq	%rdx, %rax
	ret

	.globl	rld_wrmsr
rld_wrmsr:				/* void rld_wrmsr(u32 msr, u64 value) */
	movl	%edi, %ecx
	movl	%esi, %eax
	movq	%rsi, %rdx
	shrq	$32, %rdx
	wrmsr
	ret

	.globl	rld_getsec
rld_getsec:				/* u32 rld_getsec(u32 leaf, u32 ebx, u32 out[3]) */
	pushq	%rbx
	movl	%edi, %eax
	movl	%esi, %ebx
	xorl	%ecx, %ecx
	.byte	0x0f, 0x37		/* getsec */
	movl	%eax, (%rdx)
	movl	%ebx, 4(%rdx)
	movl	%ecx, 8(%rdx)
	popq	%rbx
	ret

	.globl	rld_cpuid
rld_cpuid:				/* void rld_cpuid(u32 leaf, u32 out[4]) */
	pushq	%rbx
	movq	%rsi, %r8
	movl	%edi, %eax
	xorl	%ecx, %ecx
	cpuid
	movl	%eax, (%r8)
	movl	%ebx, 4(%r8)
	movl	%ecx, 8(%r8)
	movl	%edx, 12(%r8)
	popq	%rbx
	ret

	.globl	rld_read_cr0
rld_read_cr0:
	movq	%cr0, %rax
	ret
	.globl	rld_write_cr0
rld_write_cr0:
	movq	%rdi, %cr0
	ret
	.globl	rld_read_cr4
rld_read_cr4:
	movq	%cr4, %rax
	ret
	.globl	rld_write_cr4
rld_write_cr4:
	movq	%rdi, %cr4
	ret
	.globl	rld_wbinvd
rld_wbinvd:
	wbinvd
	ret
	.globl	rld_pause
rld_pause:
	pause
	ret
	.globl	rld_outb
rld_outb:				/* void rld_outb(u16 port, u8 value) */
	movl	%edi, %edx
	movl	%esi, %eax
	outb	%al, %dx
	ret
	.globl	rld_halt_forever
rld_halt_forever:
	cli
4:	hlt
	jmp	4b

	.section .rodata
	.p2align 3
gdt:					/* null, 32-bit code, 64-bit code, data (flat) */
	.quad	0
	.quad	0x00cf9b000000ffff
	.quad	0x00af9b000000ffff
	.quad	0x00cf93000000ffff
gdt_end:

	.data
	.p2align 3
	.globl	rld_params
rld_params:				/* struct rld_dl_params, filled by relaunchd */
	.quad	RLD_PARAMS_MAGIC
	.long	RLD_PARAMS_VERSION
	.long	RLD_PARAMS_SIZE
	.fill	RLD_PARAMS_SIZE - 16, 1, 0
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	0			/* base: set at run time */
	.p2align 3
idt_desc:
	.word	32 * 16 - 1
	.quad	0

	.bss
	.p2align 4
	.globl	saved
saved:	.skip	S_SIZE
	.globl	dlme_copy
dlme_copy:
	.skip	24
	.p2align 12
stack:	.skip	16384
stack_top:
