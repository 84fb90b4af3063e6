/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * txt.h - the Intel TXT, SMX and Secure Launch v16 layouts the DL handler uses.
 *
 * Sources (facts, not code): Intel TXT Software Development Guide 315168
 * (register space Appendix B, heap tables Appendix C, ACM format Appendix A,
 * MLE header section 2.1, capabilities Table 4) as restated in the v16 series'
 * arch/x86/include/asm/txt.h (patch 20/38), include/linux/slr_table.h (patch
 * 17/38) and include/linux/slaunch.h (patch 19/38); Intel SDM vol. 2D chapter 7
 * (GETSEC) and vol. 3A/4 (MSRs, MTRRs, local APIC); TCG PC Client Platform TPM
 * Profile (TIS access register). docs/research: drtm.md 1.4, 1.5, 3.2-3.6;
 * dl-handler.md.
 */
#ifndef RLD_TXT_H
#define RLD_TXT_H

#include <stdint.h>

/* ---- TXT configuration space (SDG Appendix B; v16 asm/txt.h) ---- */
#define TXT_PRIV_BASE           0xFED20000UL
#define TXT_PUB_BASE            0xFED30000UL
#define TXT_STS                 0x000
#define TXT_ESTS                0x008
#define TXT_ERRORCODE           0x030
#define TXT_CMD_RESET           0x038
#define TXT_DIDVID              0x110
#define TXT_VER_FSBIF           0x100
#define TXT_VER_EMIF            0x200
#define TXT_CMD_UNLOCK_MEM_CONFIG 0x218
#define TXT_SINIT_BASE          0x270
#define TXT_SINIT_SIZE          0x278
#define TXT_HEAP_BASE           0x300
#define TXT_HEAP_SIZE           0x308
#define TXT_CMD_NO_SECRETS      0x8E8
#define TXT_E2STS               0x8F0

#define TXT_STS_SENTER_DONE     (1u << 0)
#define TXT_STS_PRIVATE_OPEN    (1u << 7)
#define TXT_ESTS_TXT_RESET      (1u << 0)
#define TXT_ERRORCODE_VALID     (1u << 31)
#define TXT_ERRORCODE_SUCCESS   0xC0000001u
#define TXT_VER_DEBUG_FUSE      (1u << 31)   /* 1 = production fused (drtm.md 3.2) */

/* ---- TXT heap (SDG Appendix C; v16 asm/txt.h) ---- */
struct txt_bios_data {                  /* after its u64 size */
	uint32_t version;               /* 5: TPM 1.2, 6: TPM 2.0 */
	uint32_t bios_sinit_size;       /* 0: no SINIT ACM loaded by the BIOS */
	uint64_t reserved1;
	uint64_t reserved2;
	uint32_t num_logical_procs;
	uint32_t sinit_flags;
	uint32_t mle_flags;
	/* extended data elements (version >= 4) */
} __attribute__((packed));

/* Secure Launch's OsMleData, version 1, v15/v16 layout (slaunch.h; drtm.md 1.5). */
#define TXT_OS_MLE_VERSION      1
struct txt_os_mle_data {
	uint32_t version;
	uint32_t reserved;
	uint64_t slrt;
	uint64_t txt_info;              /* the SLRT's INTEL_INFO entry */
	uint32_t ap_wake_block;
	uint32_t ap_wake_block_size;
	uint8_t  mle_scratch[64];
} __attribute__((packed));

#define TXT_OS_SINIT_VERSION_TPM20      7
struct txt_os_sinit_data {
	uint32_t version;
	uint32_t flags;                 /* bit 0: PCR extend policy, 1 = maximum performance */
	uint64_t mle_ptab;
	uint64_t mle_size;
	uint64_t mle_hdr_base;          /* linear (= offset in the MLE) address of the header */
	uint64_t vtd_pmr_lo_base;
	uint64_t vtd_pmr_lo_size;
	uint64_t vtd_pmr_hi_base;
	uint64_t vtd_pmr_hi_size;
	uint64_t lcp_po_base;
	uint64_t lcp_po_size;
	uint32_t capabilities;
	uint64_t efi_rsdt_ptr;          /* version >= 5 */
	/* extended data elements (version >= 6) */
} __attribute__((packed));

struct txt_ext_element_header {
	uint32_t type;
	uint32_t size;                  /* including this header */
} __attribute__((packed));
#define TXT_EXT_END                     0
#define TXT_EXT_EVENT_LOG_POINTER2_1    8
struct txt_event_log_pointer2_1 {
	uint64_t phys_addr;
	uint32_t allocated_event_container_size;
	uint32_t first_record_offset;
	uint32_t next_record_offset;
} __attribute__((packed));

/* SinitMleData v9 fixed part (148 bytes): SINIT writes it; room must be left. */
#define TXT_SINIT_MLE_DATA_MIN          148

/* ---- MLE header (SDG section 2.1; v16 slr_dlme_header) ---- */
#define MLE_UUID0       0x9082AC5Au
#define MLE_UUID1       0x74A7476Fu
#define MLE_UUID2       0xA2555C0Fu
#define MLE_UUID3       0x42B651CBu
struct mle_header {
	uint32_t uuid[4];
	uint32_t header_len;            /* 0x34 */
	uint32_t version;               /* 0x00020002 in v16 */
	uint32_t entry_point;           /* offset of sl_stub_entry in the MLE */
	uint32_t first_valid_page;
	uint32_t start;                 /* 0 in v16 */
	uint32_t end;                   /* __bss_start - _text in v16: the MLE size */
	uint32_t capabilities;
	uint32_t cmdline_start;
	uint32_t cmdline_end;
} __attribute__((packed));
#define MLE_HEADER_MIN_LEN      0x34

/* MLE/SINIT capability bits (SDG Table 4) */
#define TXT_CAP_WAKE_GETSEC     (1u << 0)
#define TXT_CAP_WAKE_MONITOR    (1u << 1)
#define TXT_CAP_ECX_PT          (1u << 2)
#define TXT_CAP_TPM20_TCG_LOG   (1u << 9)

/* ---- Authenticated code module (SDG Appendix A.1) ---- */
struct acm_header {
	uint16_t module_type;           /* 2: chipset ACM */
	uint16_t module_subtype;        /* 0: TXT */
	uint32_t header_len;            /* dwords */
	uint32_t header_version;
	uint16_t chipset_id;
	uint16_t flags;                 /* bit 15: debug signed */
	uint32_t module_vendor;         /* 0x8086 */
	uint32_t date;                  /* BCD yyyymmdd: compares as a number */
	uint32_t size;                  /* dwords */
	uint16_t txt_svn;
	uint16_t se_svn;
	uint32_t code_control;
	uint32_t error_entry_point;
	uint32_t gdt_limit;
	uint32_t gdt_base;
	uint32_t seg_sel;
	uint32_t entry_point;
	uint8_t  reserved2[64];
	uint32_t key_size;
	uint32_t scratch_size;          /* dwords */
} __attribute__((packed));
#define ACM_MODULE_TYPE_CHIPSET 2
#define ACM_VENDOR_INTEL        0x8086
#define ACM_FLAG_DEBUG_SIGNED   (1u << 15)

struct acm_info_table {                 /* at (header_len + scratch_size) * 4 */
	uint8_t  uuid[16];
	uint8_t  chipset_acm_type;      /* bits 2:0: 1 = SINIT; bit 3: revocation */
	uint8_t  version;
	uint16_t length;
	uint32_t chipset_id_list;       /* offset from the module start */
	uint32_t os_sinit_data_ver;
	uint32_t min_mle_header_ver;
	uint32_t capabilities;
	uint8_t  acm_version;
	uint8_t  reserved[3];
	uint32_t processor_id_list;     /* info table version >= 4 */
} __attribute__((packed));
#define ACM_TYPE_SINIT          1
#define ACM_TYPE_MASK           0x7
#define ACM_TYPE_REVOCATION     0x8

struct acm_chipset_id {
	uint32_t flags;                 /* bit 0: revision_id is a mask */
	uint16_t vendor_id;
	uint16_t device_id;
	uint16_t revision_id;
	uint16_t reserved;
	uint32_t extended_id;
} __attribute__((packed));

struct acm_processor_id {
	uint32_t fms;
	uint32_t fms_mask;
	uint64_t platform_id;
	uint64_t platform_mask;
} __attribute__((packed));

/* ---- Secure Launch Resource Table, v16 (slr_table.h, patch 17/38) ---- */
#define SLR_TABLE_MAGIC         0x4452544Du
#define SLR_INTEL_TXT           1
#define SLR_ENTRY_DL_INFO       1
#define SLR_ENTRY_INTEL_INFO    4
struct slr_table {
	uint32_t magic;
	uint16_t revision;
	uint16_t architecture;
	uint32_t size;
	uint32_t max_size;
} __attribute__((packed));

struct slr_entry_hdr {
	uint32_t tag;
	uint32_t size;
} __attribute__((packed));

struct slr_bl_context {
	uint16_t bootloader;
	uint16_t reserved[3];
	uint64_t context;
} __attribute__((packed));

struct slr_setup_dlme {                 /* what the v16 decompressor passes (patch 38) */
	uint64_t dlme_base;
	uint64_t dlme_header_offset;
	uint64_t dlme_table;
} __attribute__((packed));

struct slr_entry_dl_info {
	struct slr_entry_hdr hdr;
	uint64_t dce_size;
	uint64_t dce_base;
	uint64_t dlme_size;
	uint64_t dlme_base;
	uint64_t dlme_entry;
	uint64_t dlme_header_offset;
	uint64_t dlme_config_table;
	struct slr_bl_context bl_context;
	uint64_t dl_launch;
} __attribute__((packed));

#define SLR_VARIABLE_MTRRS      32
struct slr_mtrr_pair {
	uint64_t physbase;
	uint64_t physmask;
} __attribute__((packed));

struct slr_entry_intel_info {
	struct slr_entry_hdr hdr;
	uint64_t boot_params_addr;
	uint64_t txt_heap;
	uint64_t saved_misc_enable_msr;
	uint64_t default_mem_type;
	uint64_t mtrr_vcnt;
	struct slr_mtrr_pair mtrr_pair[SLR_VARIABLE_MTRRS];
} __attribute__((packed));

_Static_assert(sizeof(struct txt_bios_data) == 36, "BiosData");
_Static_assert(sizeof(struct txt_os_mle_data) == 96, "OsMleData v1");
_Static_assert(sizeof(struct txt_os_sinit_data) == 92, "OsSinitData");
_Static_assert(sizeof(struct txt_event_log_pointer2_1) == 20, "log pointer 2.1");
_Static_assert(sizeof(struct mle_header) == 52, "MLE header");
_Static_assert(sizeof(struct acm_header) == 0x80, "ACM header");
_Static_assert(sizeof(struct acm_info_table) == 44, "ACM info table v4");
_Static_assert(sizeof(struct slr_entry_dl_info) == 88, "DL_INFO v16");
_Static_assert(sizeof(struct slr_entry_intel_info) == 560, "INTEL_INFO v16");

/* ---- MSRs (SDM vol. 4) ---- */
#define MSR_IA32_FEATURE_CONTROL 0x03A
#define MSR_IA32_APIC_BASE      0x01B
#define MSR_IA32_PLATFORM_ID    0x017
#define MSR_MTRRCAP             0x0FE
#define MSR_MCG_CAP             0x179
#define MSR_MCG_STATUS          0x17A
#define MSR_IA32_MISC_ENABLE    0x1A0
#define MSR_MTRR_PHYSBASE0      0x200
#define MSR_MTRR_DEF_TYPE       0x2FF
#define MSR_MC0_STATUS          0x401   /* MCi_STATUS = 0x401 + 4 * i */
#define MSR_X2APIC_ICR          0x830

#define FEATURE_CONTROL_LOCK            (1u << 0)
#define FEATURE_CONTROL_SENTER_GLOBAL   (1u << 15)
#define APIC_BASE_BSP                   (1u << 8)
#define APIC_BASE_X2APIC                (1u << 10)
#define APIC_BASE_ENABLE                (1u << 11)
#define MCG_STATUS_MCIP                 (1u << 2)
#define MCI_STATUS_VAL                  (1ULL << 63)
#define MTRR_DEF_TYPE_E                 (1u << 11)
#define MTRR_DEF_TYPE_FE                (1u << 10)
#define MTRR_PHYSMASK_VALID             (1u << 11)
#define MTRR_TYPE_UC                    0
#define MTRR_TYPE_WB                    6

/* ---- local APIC (SDM vol. 3A 11.6.1) ---- */
#define APIC_ICR_LO                     0x300
#define APIC_ICR_HI                     0x310
#define APIC_ICR_DELIVERY_PENDING       (1u << 12)
/* INIT, level assert, destination shorthand all-excluding-self (SDM vol. 3A 9.4.4.1) */
#define APIC_ICR_INIT_ALL_BUT_SELF      0x000C4500u

/* ---- TPM TIS (TCG PTP; drtm.md 3.4) ---- */
#define TPM_TIS_BASE                    0xFED40000UL
#define TPM_LOCALITY_STRIDE             0x1000
#define TPM_ACCESS                      0x00
#define TPM_ACCESS_ACTIVE_LOCALITY      (1u << 5)
#define TPM_ACCESS_RESERVED             (1u << 6)
#define TPM_ACCESS_VALID                (1u << 7)

/* ---- SMX (SDM vol. 2D 7.3) ---- */
#define GETSEC_CAPABILITIES             0
#define GETSEC_SENTER                   4
#define GETSEC_PARAMETERS               6
#define SMX_CAP_CHIPSET_PRESENT         (1u << 0)
#define SMX_CAP_SENTER                  (1u << 4)
#define SMX_CAP_PARAMETERS              (1u << 6)
#define SMX_PARAM_TYPE_MASK             0x1F
#define SMX_PARAM_NULL                  0
#define SMX_PARAM_MAX_ACM_SIZE          2
#define SMX_PARAM_TXT_EXTENSIONS        5
#define SMX_EXT_PRESERVE_MCE            (1u << 6)   /* machine-check handling, EAX bit 6 */

#define CPUID1_ECX_SMX                  (1u << 6)
#define CR0_NE                          (1u << 5)
#define CR0_NW                          (1u << 29)
#define CR0_CD                          (1u << 30)
#define CR4_PGE                         (1u << 7)
#define CR4_LA57                        (1u << 12)
#define CR4_SMXE                        (1u << 14)

#endif /* RLD_TXT_H */
