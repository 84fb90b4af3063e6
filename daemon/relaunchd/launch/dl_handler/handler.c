/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * handler.c - relaunchd's Intel TXT DL handler: from the Secure Launch v16
 * decompressor's dl_launch call to GETSEC[SENTER].
 *
 * rld_main runs every step of docs/drtm.md "The DL handler, step by step" in
 * order; each check that fails returns a reason (abi.h) and the handler either
 * returns to the decompressor (the kernel boots unmeasured; the next boot's
 * proof reports "no dynamic launch") or, with require_drtm, resets the platform.
 * Every check the v16 kernel makes after SENTER that ends in a TXT reset
 * (sl_stub.S sl_txt_verify_os_mle_struct, sl_main.c: PMR coverage, buffer
 * overlaps, OsSinitData version, the log element) is made here first, because
 * a TXT reset needs a power cycle before the next launch (drtm.md 2.3).
 *
 * Freestanding, position independent, no run-time relocations; runs on its own
 * stack, GDT, IDT and identity map set up by entry.S.
 */
#include <stddef.h>
#include <stdint.h>

#include "abi.h"
#include "txt.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define PAGE            4096ULL
#define FOUR_GIB        (1ULL << 32)
#define MAX_CPUS        512     /* SL_MAX_CPUS, v16 include/linux/slaunch.h */
#define MIN_BIOS_DATA_VERSION 5 /* versions 5 (TPM 1.2) and 6 (TPM 2.0) carry ext elements */
#define POLL_LIMIT      (1u << 20)
#define INIT_SETTLE     4096    /* pause iterations after the INIT IPI */
#define SINIT_MTRR_MASK 0xFFFFFFULL /* 36-bit physical mask SINIT expects (tboot, GRUB txt.c) */
#define OS_MLE_SIZE     (8 + sizeof(struct txt_os_mle_data))
#define OS_SINIT_SIZE   (8 + sizeof(struct txt_os_sinit_data) + \
			 sizeof(struct txt_ext_element_header) + \
			 sizeof(struct txt_event_log_pointer2_1) + \
			 sizeof(struct txt_ext_element_header))

/* entry.S */
extern struct rld_dl_params rld_params;
u64 rld_rdmsr(u32 msr);
void rld_wrmsr(u32 msr, u64 value);
u32 rld_getsec(u32 leaf, u32 ebx, u32 out[3]);
void rld_cpuid(u32 leaf, u32 out[4]);
u64 rld_read_cr0(void);
void rld_write_cr0(u64 value);
u64 rld_read_cr4(void);
void rld_write_cr4(u64 value);
void rld_wbinvd(void);
void rld_outb(u16 port, u8 value);
__attribute__((noreturn)) void rld_halt_forever(void);
__attribute__((noreturn)) void rld_senter(u32 sinit_base, u32 sinit_size);

/* called from entry.S */
u64 rld_build_identity_map(u64 cr4);
u64 rld_build_idt(u64 stubs);
u32 rld_main(struct slr_bl_context *blc, const struct slr_setup_dlme *dlme);
void rld_failed(u32 reason, u64 vector);

/* The handler's whole state: what the failure path must undo. */
static struct {
	struct slr_entry_intel_info *intel_info;  /* the MTRRs to restore */
	int mtrrs_modified;
} state;

static u64 identity_tables[7][512] __attribute__((aligned(4096)));

struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __attribute__((packed));
static struct idt_gate idt[32] __attribute__((aligned(16)));

/* ---------------------------------------------------------------- helpers */

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;

	if (!c && !((uintptr_t)d & 7)) {
		for (; n >= 8; n -= 8, d += 8)
			*(volatile u64 *)d = 0;
	}
	for (; n; n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	if (!(((uintptr_t)d | (uintptr_t)s) & 7)) {
		for (; n >= 8; n -= 8, d += 8, s += 8)
			*(volatile u64 *)d = *(const u64 *)s;
	}
	for (; n; n--)
		*d++ = *s++;
	return dst;
}

static inline void cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

static inline u64 read64(u64 addr)
{
	return *(volatile u64 *)(uintptr_t)addr;
}

static inline void write64(u64 addr, u64 value)
{
	*(volatile u64 *)(uintptr_t)addr = value;
}

static inline u8 read8(u64 addr)
{
	return *(volatile u8 *)(uintptr_t)addr;
}

static inline void write8(u64 addr, u8 value)
{
	*(volatile u8 *)(uintptr_t)addr = value;
}

static inline u32 read32(u64 addr)
{
	return *(volatile u32 *)(uintptr_t)addr;
}

static inline void write32(u64 addr, u32 value)
{
	*(volatile u32 *)(uintptr_t)addr = value;
}

static inline u64 txt_pub(u32 reg)
{
	return read64(TXT_PUB_BASE + reg);
}

/* [base, base + size) lies in [lo, hi), without wrapping. */
static int range_within(u64 base, u64 size, u64 lo, u64 hi)
{
	return base >= lo && size <= hi - lo && base - lo <= hi - lo - size;
}

static int ranges_overlap(u64 a, u64 alen, u64 b, u64 blen)
{
	return a < b + blen && b < a + alen;
}

#define FAIL(reason, value) do { rld_params.detail = (u64)(value); return (reason); } while (0)
#define STEP(n) (rld_params.step = (n))

/* ---------------------------------------------------------------- entry.S callbacks */

/*
 * Identity map of the low 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs), plus a
 * PML5 on top when the decompressor runs with 5-level paging (CR4.LA57 cannot
 * change in long mode). Everything the handler touches is below 4 GiB.
 */
u64 rld_build_identity_map(u64 cr4)
{
	u64 *pml5 = identity_tables[0], *pml4 = identity_tables[1];
	u64 *pdpt = identity_tables[2];

	memset(identity_tables, 0, sizeof(identity_tables));
	for (u64 i = 0; i < 4; i++) {
		u64 *pd = identity_tables[3 + i];

		pdpt[i] = (u64)(uintptr_t)pd | 0x3;             /* present, writable */
		for (u64 j = 0; j < 512; j++)
			pd[j] = ((i * 512 + j) << 21) | 0x83;   /* present, writable, 2 MiB */
	}
	pml4[0] = (u64)(uintptr_t)pdpt | 0x3;
	if (cr4 & CR4_LA57) {
		pml5[0] = (u64)(uintptr_t)pml4 | 0x3;
		return (u64)(uintptr_t)pml5;
	}
	return (u64)(uintptr_t)pml4;
}

/* Vectors 0-31 -> exception_stubs + 16 * vector, 64-bit interrupt gates on our CS. */
u64 rld_build_idt(u64 stubs)
{
	for (u32 v = 0; v < 32; v++) {
		u64 target = stubs + 16 * v;

		idt[v].offset_lo = (u16)target;
		idt[v].selector = 0x10;
		idt[v].ist = 0;
		idt[v].type = 0x8E;             /* present, DPL 0, 64-bit interrupt gate */
		idt[v].offset_mid = (u16)(target >> 16);
		idt[v].offset_hi = (u32)(target >> 32);
		idt[v].reserved = 0;
	}
	return (u64)(uintptr_t)idt;
}

/* ---------------------------------------------------------------- SINIT ACMs */

static u32 cpuid_eax(u32 leaf)
{
	u32 r[4];

	rld_cpuid(leaf, r);
	return r[0];
}

/*
 * Is the module at `base` a SINIT ACM (SDG A.1) for this chipset and CPU? The
 * same rules as relaunchd's formats/acm.py and GRUB's acmod.c: header type and
 * vendor, Size * 4 == `size`, the info table's UUID and SINIT type, a chipset ID
 * entry matching TXT.DIDVID, debug/production signing matching VER.EMIF, and
 * (info table version >= 4) a processor ID entry matching CPUID.1:EAX and
 * IA32_PLATFORM_ID.
 */
static int acm_usable(u64 base, u64 size)
{
	static const u8 uuid[16] = {0xaa, 0x3a, 0xc0, 0x7f, 0xa7, 0x46, 0xdb, 0x18,
				    0x2e, 0xac, 0x69, 0x8f, 0x8d, 0x41, 0x7f, 0x5a};
	const struct acm_header *h = (const void *)(uintptr_t)base;
	const struct acm_info_table *info;
	u64 info_off, list, didvid, fms, platform;
	u32 count;
	int production;

	if (size < sizeof(*h) || !range_within(base, size, 0, FOUR_GIB))
		return 0;
	if (h->module_type != ACM_MODULE_TYPE_CHIPSET || h->module_vendor != ACM_VENDOR_INTEL)
		return 0;
	if ((u64)h->size * 4 != size)
		return 0;
	info_off = ((u64)h->header_len + h->scratch_size) * 4;
	if (info_off > size || size - info_off < sizeof(*info))
		return 0;
	info = (const void *)(uintptr_t)(base + info_off);
	for (int i = 0; i < 16; i++)
		if (info->uuid[i] != uuid[i])
			return 0;
	if ((info->chipset_acm_type & ACM_TYPE_MASK) != ACM_TYPE_SINIT ||
	    (info->chipset_acm_type & ACM_TYPE_REVOCATION))
		return 0;

	production = !!(txt_pub(TXT_VER_EMIF) & TXT_VER_DEBUG_FUSE);
	if (!!(h->flags & ACM_FLAG_DEBUG_SIGNED) == production)
		return 0;

	didvid = txt_pub(TXT_DIDVID);
	list = info->chipset_id_list;
	if (list > size || size - list < 4)
		return 0;
	count = read32(base + list);
	if (count > (size - list - 4) / sizeof(struct acm_chipset_id))
		return 0;
	for (u32 i = 0; i < count; i++) {
		const struct acm_chipset_id *c = (const void *)(uintptr_t)
			(base + list + 4 + (u64)i * sizeof(*c));
		u16 rid = (u16)(didvid >> 32);

		if (c->vendor_id != (u16)didvid || c->device_id != (u16)(didvid >> 16))
			continue;
		if ((c->flags & 1) ? (c->revision_id & rid) : (c->revision_id == rid))
			goto chipset_ok;
	}
	return 0;
chipset_ok:
	if (info->version < 4)
		return 1;
	list = info->processor_id_list;
	if (list > size || size - list < 4)
		return 0;
	count = read32(base + list);
	if (count > (size - list - 4) / sizeof(struct acm_processor_id))
		return 0;
	fms = cpuid_eax(1);
	platform = rld_rdmsr(MSR_IA32_PLATFORM_ID);
	for (u32 i = 0; i < count; i++) {
		const struct acm_processor_id *p = (const void *)(uintptr_t)
			(base + list + 4 + (u64)i * sizeof(*p));

		if ((fms & p->fms_mask) == (p->fms & p->fms_mask) &&
		    (platform & p->platform_mask) == (p->platform_id & p->platform_mask))
			return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------- MTRRs */

/* Variable MTRRs needed to make [base, base + size) WB: aligned power-of-two blocks. */
static u32 mtrr_blocks(u64 base, u64 size, u64 *block_base, u64 *block_size, u32 max)
{
	u32 n = 0;

	size = (size + PAGE - 1) & ~(PAGE - 1);
	while (size) {
		u64 chunk = 1ULL << (63 - __builtin_clzll(size));
		u64 align = base ? base & -base : chunk;

		if (chunk > align)
			chunk = align;
		if (n < max) {
			block_base[n] = base;
			block_size[n] = chunk;
		}
		n++;
		base += chunk;
		size -= chunk;
	}
	return n;
}

/*
 * The SDM's MTRR update sequence (vol. 3A 12.11.7.2 "MemTypeSet"): caches off
 * (CD=1, NW=0), WBINVD, PGE off, MTRRs disabled; program; WBINVD, MTRRs on,
 * caches and PGE back.
 */
struct mtrr_write {
	u32 vcnt;
	u64 def_type;
	const u64 *base;
	const u64 *mask;
};

static void mtrr_update(const struct mtrr_write *w)
{
	u64 cr0 = rld_read_cr0(), cr4 = rld_read_cr4();

	rld_write_cr0((cr0 | CR0_CD) & ~(u64)CR0_NW);
	rld_wbinvd();
	rld_write_cr4(cr4 & ~(u64)CR4_PGE);
	rld_wrmsr(MSR_MTRR_DEF_TYPE, rld_rdmsr(MSR_MTRR_DEF_TYPE) & ~(u64)MTRR_DEF_TYPE_E);
	for (u32 i = 0; i < w->vcnt; i++) {
		rld_wrmsr(MSR_MTRR_PHYSBASE0 + 2 * i, w->base[i]);
		rld_wrmsr(MSR_MTRR_PHYSBASE0 + 2 * i + 1, w->mask[i]);
	}
	rld_wbinvd();
	rld_wrmsr(MSR_MTRR_DEF_TYPE, w->def_type);
	rld_write_cr0(cr0);
	rld_write_cr4(cr4);
}

/* Back to what INTEL_INFO saved: the failure path after the MTRRs changed. */
static void mtrr_restore(const struct slr_entry_intel_info *ii)
{
	u64 base[SLR_VARIABLE_MTRRS], mask[SLR_VARIABLE_MTRRS];
	struct mtrr_write w = {(u32)ii->mtrr_vcnt, ii->default_mem_type, base, mask};

	for (u32 i = 0; i < w.vcnt; i++) {
		base[i] = ii->mtrr_pair[i].physbase;
		mask[i] = ii->mtrr_pair[i].physmask;
	}
	mtrr_update(&w);
}

/* ---------------------------------------------------------------- the launch */

struct launch {
	struct rld_dl_params *p;
	struct slr_entry_dl_info *dl_info;
	struct slr_entry_intel_info *ii;
	u64 heap, heap_size, bios_size;
	struct txt_bios_data *bios;
	u32 smx_ext, max_acm;
	u64 mle_base, mle_size, mle_hdr_off;
	const struct mle_header *mle;
	u64 sinit_base, sinit_size;
	int sinit_ours;
	u32 acm_caps, acm_min_mle;
};

static u32 check_context(struct launch *l, struct slr_bl_context *blc,
			 const struct slr_setup_dlme *dlme)
{
	struct rld_dl_params *p = l->p;
	const struct slr_table *t;
	u64 dl = (u64)(uintptr_t)blc - offsetof(struct slr_entry_dl_info, bl_context);

	STEP(1);
	if (p->magic != RLD_PARAMS_MAGIC || p->version != RLD_PARAMS_VERSION ||
	    p->size != RLD_PARAMS_SIZE)
		FAIL(RLD_REASON_BAD_CONTEXT, p->magic);
	if (blc->context != (u64)(uintptr_t)p)
		FAIL(RLD_REASON_BAD_CONTEXT, blc->context);
	if (dl != p->dl_info || !p->slrt || !p->intel_info)
		FAIL(RLD_REASON_BAD_CONTEXT, dl);
	t = (const void *)(uintptr_t)p->slrt;
	if (t->magic != SLR_TABLE_MAGIC || t->architecture != SLR_INTEL_TXT)
		FAIL(RLD_REASON_BAD_CONTEXT, t->magic);
	l->dl_info = (void *)(uintptr_t)dl;
	l->ii = (void *)(uintptr_t)p->intel_info;
	if (!range_within(dl, sizeof(*l->dl_info), p->slrt, p->slrt + t->size) ||
	    l->dl_info->hdr.tag != SLR_ENTRY_DL_INFO || l->dl_info->hdr.size != 88)
		FAIL(RLD_REASON_BAD_CONTEXT, dl);
	if (!range_within(p->intel_info, sizeof(*l->ii), p->slrt, p->slrt + t->size) ||
	    l->ii->hdr.tag != SLR_ENTRY_INTEL_INFO || l->ii->hdr.size != 560)
		FAIL(RLD_REASON_BAD_CONTEXT, p->intel_info);
	if (!dlme)
		FAIL(RLD_REASON_BAD_CONTEXT, 0);
	return RLD_REASON_NONE;
}

/* CPU and TXT state: SMX, firmware enables, ESTS/ERRORCODE, no launch active. */
static u32 check_platform(void)
{
	u32 r[4];
	u64 v;

	STEP(2);
	v = rld_rdmsr(MSR_IA32_APIC_BASE);
	if (!(v & APIC_BASE_BSP))               /* SDM 7.3 SENTER: the ILP must be the BSP */
		FAIL(RLD_REASON_NOT_BSP, v);
	rld_cpuid(1, r);
	if (!(r[2] & CPUID1_ECX_SMX))
		FAIL(RLD_REASON_NO_SMX, r[2]);
	v = rld_rdmsr(MSR_IA32_FEATURE_CONTROL);
	if (!(v & FEATURE_CONTROL_LOCK) || !(v & FEATURE_CONTROL_SENTER_GLOBAL))
		FAIL(RLD_REASON_FEATURE_CONTROL, v);
	v = txt_pub(TXT_ESTS);
	if (v & TXT_ESTS_TXT_RESET)             /* sticky until a power cycle */
		FAIL(RLD_REASON_TXT_RESET_PENDING, v);
	v = txt_pub(TXT_ERRORCODE) & 0xFFFFFFFFu;
	if ((v & TXT_ERRORCODE_VALID) && v != TXT_ERRORCODE_SUCCESS)
		FAIL(RLD_REASON_TXT_ERROR, v);
	v = txt_pub(TXT_STS);
	if (v & TXT_STS_SENTER_DONE)            /* no SEXIT after the last launch */
		FAIL(RLD_REASON_SENTER_DONE, v);
	return RLD_REASON_NONE;
}

/* The TXT heap (SDG Appendix C): BiosData sane, room for our tables and SINIT's. */
static u32 check_heap(struct launch *l)
{
	u64 need;

	STEP(3);
	l->heap = txt_pub(TXT_HEAP_BASE);
	l->heap_size = txt_pub(TXT_HEAP_SIZE);
	if (!l->heap || !l->heap_size || (l->heap & 7) ||
	    !range_within(l->heap, l->heap_size, 0, FOUR_GIB))
		FAIL(RLD_REASON_HEAP_INVALID, l->heap);
	if (l->heap_size < 8)
		FAIL(RLD_REASON_HEAP_TOO_SMALL, l->heap_size);
	l->bios_size = read64(l->heap);
	if (l->bios_size < 8 + sizeof(struct txt_bios_data) || l->bios_size > l->heap_size)
		FAIL(RLD_REASON_HEAP_INVALID, l->bios_size);
	l->bios = (void *)(uintptr_t)(l->heap + 8);
	if (l->bios->version < MIN_BIOS_DATA_VERSION)
		FAIL(RLD_REASON_BIOS_DATA_VERSION, l->bios->version);
	if (!l->bios->num_logical_procs || l->bios->num_logical_procs > MAX_CPUS)
		FAIL(RLD_REASON_CPU_COUNT, l->bios->num_logical_procs);
	need = l->bios_size + OS_MLE_SIZE + OS_SINIT_SIZE + 8 + TXT_SINIT_MLE_DATA_MIN;
	if (need > l->heap_size)
		FAIL(RLD_REASON_HEAP_TOO_SMALL, l->heap_size);
	return RLD_REASON_NONE;
}

/* CR4.SMXE, then GETSEC[CAPABILITIES] and [PARAMETERS] (SDM vol. 2D 7.3). */
static u32 check_smx(struct launch *l)
{
	u32 out[3];
	u32 caps;

	STEP(4);
	rld_write_cr4(rld_read_cr4() | CR4_SMXE);
	caps = rld_getsec(GETSEC_CAPABILITIES, 0, out);
	if ((caps & (SMX_CAP_CHIPSET_PRESENT | SMX_CAP_SENTER | SMX_CAP_PARAMETERS)) !=
	    (SMX_CAP_CHIPSET_PRESENT | SMX_CAP_SENTER | SMX_CAP_PARAMETERS))
		FAIL(RLD_REASON_GETSEC_CAPABILITIES, caps);
	for (u32 i = 0; i < 64; i++) {
		u32 eax = rld_getsec(GETSEC_PARAMETERS, i, out);
		u32 type = eax & SMX_PARAM_TYPE_MASK;

		if (type == SMX_PARAM_NULL)
			break;
		if (type == SMX_PARAM_MAX_ACM_SIZE)
			l->max_acm = eax & ~(u32)SMX_PARAM_TYPE_MASK;   /* EAX[31:5] * 32 */
		if (type == SMX_PARAM_TXT_EXTENSIONS)
			l->smx_ext = eax;
	}
	return RLD_REASON_NONE;
}

/*
 * The MLE: the kernel the decompressor just extracted in place. Its size and
 * entry come from its own MLE header (v16 sl_stub.S: start 0, end = __bss_start -
 * _text, entry = sl_stub_entry - _text), not from the kexec segment, which also
 * holds the decompression area.
 */
static u32 check_mle(struct launch *l, const struct slr_setup_dlme *dlme)
{
	struct rld_dl_params *p = l->p;
	const struct mle_header *h;
	u32 want;

	STEP(6);
	l->mle_base = dlme->dlme_base;
	l->mle_hdr_off = dlme->dlme_header_offset;
	if (l->mle_base != p->kernel_base || (l->mle_base & (PAGE - 1)) ||
	    !range_within(p->kernel_base, p->kernel_size, 0, FOUR_GIB))
		FAIL(RLD_REASON_MLE_LOCATION, l->mle_base);
	if (p->kernel_size < sizeof(*h) || l->mle_hdr_off > p->kernel_size - sizeof(*h))
		FAIL(RLD_REASON_MLE_HEADER, l->mle_hdr_off);
	h = (const void *)(uintptr_t)(l->mle_base + l->mle_hdr_off);
	if (h->uuid[0] != MLE_UUID0 || h->uuid[1] != MLE_UUID1 ||
	    h->uuid[2] != MLE_UUID2 || h->uuid[3] != MLE_UUID3)
		FAIL(RLD_REASON_MLE_HEADER, h->uuid[0]);
	if (h->header_len < MLE_HEADER_MIN_LEN || (h->version >> 16) != 2 ||
	    h->version < p->min_mle_version || h->version < l->acm_min_mle)
		FAIL(RLD_REASON_MLE_HEADER, h->version);
	if (h->start != 0 || h->first_valid_page != 0)
		FAIL(RLD_REASON_MLE_HEADER, h->start);
	if (!h->end || h->end > p->kernel_size || h->end < l->mle_hdr_off + sizeof(*h) ||
	    h->entry_point >= h->end)
		FAIL(RLD_REASON_MLE_HEADER, h->end);
	want = p->os_sinit_caps & (TXT_CAP_WAKE_GETSEC | TXT_CAP_WAKE_MONITOR |
				   TXT_CAP_ECX_PT | TXT_CAP_TPM20_TCG_LOG);
	if ((h->capabilities & want) != want)
		FAIL(RLD_REASON_MLE_CAPABILITIES, h->capabilities);
	l->mle = h;
	l->mle_size = h->end;
	return RLD_REASON_NONE;
}

static u64 ptab_bytes(u64 mle_size)
{
	u64 pages = (mle_size + PAGE - 1) / PAGE;

	return (2 + (pages + 511) / 512) * PAGE;        /* PDPT, PD, page tables */
}

/* Where everything lies, against the checks v16 makes after the launch. */
static u32 check_layout(struct launch *l)
{
	struct rld_dl_params *p = l->p;
	u64 lo_end = p->pmr_lo_base + p->pmr_lo_size;

	STEP(7);
	if (l->mle_size > (1ULL << 30) || ptab_bytes(l->mle_size) > p->mle_ptab_size)
		FAIL(RLD_REASON_PTAB_TOO_SMALL, p->mle_ptab_size);
	/* SDG 2.2.4.1 as tboot and GRUB read it: page tables directly below the MLE. */
	if (p->mle_ptab + p->mle_ptab_size != l->mle_base)
		FAIL(RLD_REASON_MLE_LOCATION, p->mle_ptab);
	if (p->pmr_lo_base != 0)                                /* SL_ERROR_LO_PMR_BASE */
		FAIL(RLD_REASON_BEYOND_PMR, p->pmr_lo_base);
	if (!range_within(p->mle_ptab, p->mle_ptab_size + l->mle_size, 0, lo_end))
		FAIL(RLD_REASON_BEYOND_PMR, l->mle_base + l->mle_size); /* SL_ERROR_LO_PMR_MLE */
	if (!range_within(p->ap_wake_block, p->ap_wake_block_size, 0, lo_end))
		FAIL(RLD_REASON_BEYOND_PMR, p->ap_wake_block);  /* SL_ERROR_BUFFER_BEYOND_PMR */
	if (ranges_overlap(p->ap_wake_block, p->ap_wake_block_size, l->mle_base, l->mle_size))
		FAIL(RLD_REASON_MLE_LOCATION, p->ap_wake_block); /* SL_ERROR_MLE_BUFFER_OVERLAP */
	if (!range_within(l->ii->boot_params_addr, PAGE, 0, lo_end))
		FAIL(RLD_REASON_BEYOND_PMR, l->ii->boot_params_addr);
	if (!p->event_log || !range_within(p->event_log, p->event_log_size, 0, lo_end))
		FAIL(RLD_REASON_BEYOND_PMR, p->event_log);
	if (ranges_overlap(p->event_log, p->event_log_size, l->mle_base, l->mle_size))
		FAIL(RLD_REASON_MLE_LOCATION, p->event_log);
	return RLD_REASON_NONE;
}

/*
 * The SINIT ACM SENTER will run: the BIOS copy at TXT.SINIT.BASE when it is a
 * usable SINIT at least as new (by date) as relaunchd's, else relaunchd's,
 * copied there (GRUB's grub_txt_sinit_select does the same).
 */
static u32 choose_sinit(struct launch *l)
{
	struct rld_dl_params *p = l->p;
	u64 region = txt_pub(TXT_SINIT_BASE), region_size = txt_pub(TXT_SINIT_SIZE);
	u64 bios_size = l->bios->bios_sinit_size;
	const struct acm_header *acm;
	const struct acm_info_table *info;
	int bios_ok, ours_ok;

	STEP(5);
	if (!region || !region_size)
		FAIL(RLD_REASON_NO_SINIT, region);
	bios_ok = bios_size && bios_size <= region_size && acm_usable(region, bios_size);
	ours_ok = p->sinit && acm_usable(p->sinit, p->sinit_size);
	if (bios_ok && (!ours_ok || ((const struct acm_header *)(uintptr_t)region)->date >=
			((const struct acm_header *)(uintptr_t)p->sinit)->date)) {
		l->sinit_base = region;
		l->sinit_size = bios_size;
		l->sinit_ours = 0;
	} else if (ours_ok) {
		if (p->sinit_size > region_size)
			FAIL(RLD_REASON_SINIT_TOO_LARGE, p->sinit_size);
		l->sinit_base = region;
		l->sinit_size = p->sinit_size;
		l->sinit_ours = 1;
	} else {
		FAIL(RLD_REASON_NO_SINIT, p->sinit);
	}
	if (l->max_acm && l->sinit_size > l->max_acm)
		FAIL(RLD_REASON_SINIT_TOO_LARGE, l->sinit_size);
	if (l->sinit_base + l->sinit_size > FOUR_GIB)
		FAIL(RLD_REASON_SINIT_TOO_LARGE, l->sinit_base);
	acm = (const void *)(uintptr_t)(l->sinit_ours ? p->sinit : l->sinit_base);
	info = (const void *)((const u8 *)acm + ((u64)acm->header_len + acm->scratch_size) * 4);
	l->acm_caps = info->capabilities;
	l->acm_min_mle = info->min_mle_header_ver;
	/* What relaunchd requests must be what this SINIT offers (SDG Table 4). */
	if ((p->os_sinit_caps & l->acm_caps) != p->os_sinit_caps)
		FAIL(RLD_REASON_SINIT_CAPABILITIES, l->acm_caps);
	return RLD_REASON_NONE;
}

/*
 * MLE page tables (SDG 2.2.4.1): PDPT[0] -> PD, PD[i] -> page table i, 4 KiB
 * entries over the MLE in ascending physical order, present bit only; linear 0
 * is the MLE base, which is how v16's sl_find_mle_base finds it (PDPT[0] ->
 * PD[0] -> PT[0]).
 */
static void build_mle_page_tables(struct launch *l)
{
	u64 ptab = l->p->mle_ptab;
	u64 *pdpt = (void *)(uintptr_t)ptab, *pd = (void *)(uintptr_t)(ptab + PAGE);
	u64 pages = (l->mle_size + PAGE - 1) / PAGE;

	memset(pdpt, 0, ptab_bytes(l->mle_size));
	pdpt[0] = (ptab + PAGE) | 1;
	for (u64 i = 0; i < pages; i++) {
		u64 *pt = (void *)(uintptr_t)(ptab + (2 + i / 512) * PAGE);

		if (i % 512 == 0)
			pd[i / 512] = (u64)(uintptr_t)pt | 1;
		pt[i % 512] = (l->mle_base + i * PAGE) | 1;
	}
}

/* OsMleData v1 and OsSinitData v7 after BiosData (SDG Appendix C; v16 slaunch.h). */
static void build_heap(struct launch *l)
{
	struct rld_dl_params *p = l->p;
	u64 at = l->heap + l->bios_size;
	struct txt_os_mle_data *mle = (void *)(uintptr_t)(at + 8);
	struct txt_os_sinit_data *os;
	struct txt_ext_element_header *e;
	struct txt_event_log_pointer2_1 *log;

	write64(at, OS_MLE_SIZE);
	memset(mle, 0, sizeof(*mle));
	mle->version = TXT_OS_MLE_VERSION;
	mle->slrt = p->slrt;
	mle->txt_info = p->intel_info;
	mle->ap_wake_block = (u32)p->ap_wake_block;
	mle->ap_wake_block_size = (u32)p->ap_wake_block_size;

	at += OS_MLE_SIZE;
	write64(at, OS_SINIT_SIZE);
	os = (void *)(uintptr_t)(at + 8);
	memset(os, 0, OS_SINIT_SIZE - 8);
	os->version = TXT_OS_SINIT_VERSION_TPM20;
	os->flags = p->os_sinit_flags;
	os->mle_ptab = p->mle_ptab;
	os->mle_size = l->mle_size;
	os->mle_hdr_base = l->mle_hdr_off;
	os->vtd_pmr_lo_base = p->pmr_lo_base;
	os->vtd_pmr_lo_size = p->pmr_lo_size;
	os->vtd_pmr_hi_base = p->pmr_hi_base;
	os->vtd_pmr_hi_size = p->pmr_hi_size;
	os->capabilities = p->os_sinit_caps;
	os->efi_rsdt_ptr = p->rsdp;
	e = (void *)(os + 1);
	e->type = TXT_EXT_EVENT_LOG_POINTER2_1;
	e->size = sizeof(*e) + sizeof(*log);
	log = (void *)(e + 1);
	log->phys_addr = p->event_log;
	log->allocated_event_container_size = (u32)p->event_log_size;
	e = (void *)(log + 1);
	e->type = TXT_EXT_END;
	e->size = sizeof(*e);
}

/*
 * INTEL_INFO as the CPU is now: the v16 kernel restores and then compares these
 * after the launch (sl_txt_load_regs, sl_txt_validate_msrs).
 */
static u32 save_msrs(struct launch *l)
{
	struct slr_entry_intel_info *ii = l->ii;
	u64 vcnt = rld_rdmsr(MSR_MTRRCAP) & 0xFF;
	u64 misc = rld_rdmsr(MSR_IA32_MISC_ENABLE), def = rld_rdmsr(MSR_MTRR_DEF_TYPE);
	int changed;

	STEP(9);
	if (vcnt > SLR_VARIABLE_MTRRS)
		FAIL(RLD_REASON_MTRR_COUNT, vcnt);
	changed = ii->saved_misc_enable_msr != misc || ii->default_mem_type != def ||
		  ii->mtrr_vcnt != vcnt;
	for (u32 i = 0; i < SLR_VARIABLE_MTRRS; i++) {
		u64 base = i < vcnt ? rld_rdmsr(MSR_MTRR_PHYSBASE0 + 2 * i) : 0;
		u64 mask = i < vcnt ? rld_rdmsr(MSR_MTRR_PHYSBASE0 + 2 * i + 1) : 0;

		changed |= ii->mtrr_pair[i].physbase != base || ii->mtrr_pair[i].physmask != mask;
		ii->mtrr_pair[i].physbase = base;
		ii->mtrr_pair[i].physmask = mask;
	}
	ii->txt_heap = l->heap;
	ii->saved_misc_enable_msr = misc;
	ii->default_mem_type = def;
	ii->mtrr_vcnt = vcnt;
	if (changed)
		l->p->out_flags |= RLD_OUT_INTEL_INFO_CHANGED;
	state.intel_info = ii;
	return RLD_REASON_NONE;
}

/* SINIT in WB, everything else UC, fixed MTRRs off (SDG 2.2.5.1; GRUB and tboot). */
static u32 program_mtrrs(struct launch *l)
{
	u64 bb[SLR_VARIABLE_MTRRS], bs[SLR_VARIABLE_MTRRS];
	u64 base[SLR_VARIABLE_MTRRS], mask[SLR_VARIABLE_MTRRS];
	u32 vcnt = (u32)l->ii->mtrr_vcnt;
	u32 n = mtrr_blocks(l->sinit_base, l->sinit_size, bb, bs, SLR_VARIABLE_MTRRS);
	struct mtrr_write w = {vcnt, 0, base, mask};

	STEP(10);
	if (rld_rdmsr(MSR_MCG_STATUS) & MCG_STATUS_MCIP)
		FAIL(RLD_REASON_MACHINE_CHECK, rld_rdmsr(MSR_MCG_STATUS));
	if (n > vcnt)
		FAIL(RLD_REASON_MTRR_COUNT, n);
	for (u32 i = 0; i < vcnt; i++) {
		base[i] = i < n ? (((bb[i] >> 12) & SINIT_MTRR_MASK) << 12) | MTRR_TYPE_WB : 0;
		mask[i] = i < n ? ((~(bs[i] - 1) >> 12 & SINIT_MTRR_MASK) << 12) |
				  MTRR_PHYSMASK_VALID : 0;
	}
	w.def_type = (l->ii->default_mem_type & ~(u64)(0xFF | MTRR_DEF_TYPE_FE)) |
		     MTRR_TYPE_UC | MTRR_DEF_TYPE_E;
	state.mtrrs_modified = 1;
	mtrr_update(&w);
	return RLD_REASON_NONE;
}

/*
 * No active TPM locality (SDM 7.3 SENTER: "TPM.ACCESS_0.activeLocality bit is
 * clear"). Localities 0 and 1 are the ones software reaches before a launch;
 * 2-4 belong to the MLE, the ACM and the CPU (drtm.md 3.4).
 */
static u32 release_tpm(void)
{
	u8 v = read8(TPM_TIS_BASE + TPM_ACCESS);

	STEP(11);
	if (!(v & TPM_ACCESS_VALID) || (v & TPM_ACCESS_RESERVED))
		FAIL(RLD_REASON_TPM_NOT_TIS, v);
	for (u32 loc = 0; loc < 2; loc++) {
		u64 reg = TPM_TIS_BASE + loc * TPM_LOCALITY_STRIDE + TPM_ACCESS;
		u32 n = 0;

		v = read8(reg);
		if (!(v & TPM_ACCESS_VALID) || (v & TPM_ACCESS_RESERVED))
			continue;               /* window closed: not reachable, not active */
		if (!(v & TPM_ACCESS_ACTIVE_LOCALITY))
			continue;
		write8(reg, TPM_ACCESS_ACTIVE_LOCALITY);  /* writing 1 relinquishes */
		while ((read8(reg) & TPM_ACCESS_ACTIVE_LOCALITY) && ++n < POLL_LIMIT)
			cpu_relax();
		if (n == POLL_LIMIT)
			FAIL(RLD_REASON_TPM_LOCALITY, (loc << 8) | read8(reg));
	}
	return RLD_REASON_NONE;
}

/*
 * INIT to every other CPU (SDM vol. 3A 9.4.4.1's broadcast INIT): after a kexec
 * the APs are parked by the old kernel, not in wait-for-SIPI as after firmware.
 * Whether SENTER needs this is unconfirmed on hardware (dl-handler.md "kexec
 * specifics"); it is the state the SENTER rendezvous is documented against.
 */
static u32 init_other_cpus(void)
{
	u64 apic = rld_rdmsr(MSR_IA32_APIC_BASE);
	u32 n = 0;

	STEP(12);
	if (!(apic & APIC_BASE_ENABLE))
		FAIL(RLD_REASON_APIC, apic);
	if (apic & APIC_BASE_X2APIC) {
		rld_wrmsr(MSR_X2APIC_ICR, APIC_ICR_INIT_ALL_BUT_SELF);
	} else {
		u64 mmio = apic & 0xFFFFFF000ULL;

		write32(mmio + APIC_ICR_HI, 0);
		write32(mmio + APIC_ICR_LO, APIC_ICR_INIT_ALL_BUT_SELF);
		while ((read32(mmio + APIC_ICR_LO) & APIC_ICR_DELIVERY_PENDING) && ++n < POLL_LIMIT)
			cpu_relax();
		if (n == POLL_LIMIT)
			FAIL(RLD_REASON_APIC, read32(mmio + APIC_ICR_LO));
	}
	for (n = 0; n < INIT_SETTLE; n++)
		cpu_relax();
	return RLD_REASON_NONE;
}

/*
 * CR0 and the machine-check banks as SENTER wants them (SDM 7.3: CR0.CD = NW = 0,
 * CR0.NE = 1; no machine check in progress and MCi_STATUS clear unless GETSEC
 * [PARAMETERS] reports that machine-check errors are preserved).
 */
static u32 prepare_cpu(struct launch *l)
{
	STEP(13);
	rld_write_cr0((rld_read_cr0() & ~(u64)(CR0_CD | CR0_NW)) | CR0_NE);
	if (!(l->smx_ext & SMX_EXT_PRESERVE_MCE)) {
		u32 banks = (u32)(rld_rdmsr(MSR_MCG_CAP) & 0xFF);

		for (u32 i = 0; i < banks; i++) {
			u32 msr = MSR_MC0_STATUS + 4 * i;

			if (!(rld_rdmsr(msr) & MCI_STATUS_VAL))
				continue;
			rld_wrmsr(msr, 0);
			if (rld_rdmsr(msr) & MCI_STATUS_VAL)
				FAIL(RLD_REASON_MACHINE_CHECK, i);
		}
	}
	return RLD_REASON_NONE;
}

u32 rld_main(struct slr_bl_context *blc, const struct slr_setup_dlme *dlme)
{
	struct launch l = {.p = &rld_params};
	struct slr_entry_dl_info *dl;
	u32 r;

	rld_params.status = RLD_STATUS_NOT_RUN;
	rld_params.reason = RLD_REASON_NONE;
	rld_params.detail = 0;
	rld_params.out_flags = 0;
	if ((r = check_context(&l, blc, dlme)) || (r = check_platform()) ||
	    (r = check_heap(&l)) || (r = check_smx(&l)) || (r = choose_sinit(&l)) ||
	    (r = check_mle(&l, dlme)) || (r = check_layout(&l)))
		return r;

	STEP(8);
	build_mle_page_tables(&l);
	build_heap(&l);
	if (l.sinit_ours)
		memcpy((void *)(uintptr_t)l.sinit_base, (const void *)(uintptr_t)l.p->sinit,
		       l.sinit_size);
	else
		l.p->out_flags |= RLD_OUT_BIOS_SINIT;
	dl = l.dl_info;
	dl->dce_base = l.sinit_base;
	dl->dce_size = l.sinit_size;
	dl->dlme_base = l.mle_base;
	dl->dlme_size = l.mle_size;
	dl->dlme_entry = l.mle->entry_point;
	dl->dlme_header_offset = l.mle_hdr_off;

	if ((r = save_msrs(&l)) || (r = program_mtrrs(&l)) || (r = release_tpm()) ||
	    (r = init_other_cpus()) || (r = prepare_cpu(&l)))
		return r;

	STEP(14);
	rld_params.status = RLD_STATUS_LAUNCHING;
	rld_senter((u32)l.sinit_base, (u32)l.sinit_size);
}

/*
 * The failure path (entry.S rld_fail): report, undo the MTRRs, then reset
 * (require_drtm) or return so entry.S goes back to the decompressor.
 *
 * The reset leaves the reason where the next boot can read it when it can: a
 * write to TXT.ERRORCODE is only possible in the private space, which is open
 * only while a measured launch is active (TXT.STS.PRIVATE-OPEN; SDG Appendix B),
 * the sequence then being the v16 kernel's own (sl_main.c sl_txt_reset: ERRORCODE,
 * E2STS read as a barrier, UNLOCK-MEM-CONFIG, CMD.RESET). Before a launch the
 * private space is closed, so the reset is the Reset Control Register's (port
 * 0xCF9: 0x02 then 0x0E, a cold reset, as Linux's reboot=pci does) and the
 * reason survives only as "the relaunch ended in a reset" (docs/drtm.md).
 */
void rld_failed(u32 reason, u64 vector)
{
	rld_params.reason = reason;
	if (reason == RLD_REASON_EXCEPTION)
		rld_params.detail = vector;
	if (state.mtrrs_modified) {
		mtrr_restore(state.intel_info);
		state.mtrrs_modified = 0;
	}
	if (!(rld_params.flags & RLD_FLAG_REQUIRE_DRTM)) {
		rld_params.status = RLD_STATUS_RETURNED;
		return;
	}
	rld_params.status = RLD_STATUS_RESETTING;
	if (txt_pub(TXT_STS) & TXT_STS_PRIVATE_OPEN) {
		write64(TXT_PRIV_BASE + TXT_ERRORCODE, RLD_ERRORCODE_BASE | reason);
		(void)read64(TXT_PRIV_BASE + TXT_E2STS);
		write64(TXT_PRIV_BASE + TXT_CMD_UNLOCK_MEM_CONFIG, 1);
		(void)read64(TXT_PRIV_BASE + TXT_E2STS);
		write64(TXT_PRIV_BASE + TXT_CMD_RESET, 1);
	}
	rld_outb(0xCF9, 0x02);
	rld_outb(0xCF9, 0x0E);
	rld_halt_forever();
}
