/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * abi.h - the contract between relaunchd (launch/dl_handler.py) and its Intel TXT
 * DL handler binary: the header at offset 0 of the binary, the parameter block
 * relaunchd fills at stage time, and the reason codes the handler reports.
 * docs/drtm.md describes the whole path; launch/dl_handler.py mirrors every
 * offset below (tests/unit/launch/test_dl_handler_abi.py checks both against
 * the built binary).
 */
#ifndef RLD_DL_ABI_H
#define RLD_DL_ABI_H

#define RLD_DL_ABI_VERSION      1
#define RLD_DL_HEADER_SIZE      64
#define RLD_DL_SLRT_LAYOUT      16      /* Secure Launch v16 (slr_table.h, patch 17/38) */
#define RLD_DL_ALIGN            4096
#define RLD_PARAMS_VERSION      1
#define RLD_PARAMS_SIZE         200
/* "RLDLPARM" read as a little-endian u64 */
#define RLD_PARAMS_MAGIC        0x4d5241504c444c52ULL

/* params.flags */
#define RLD_FLAG_REQUIRE_DRTM   (1u << 0)   /* launch.require_drtm: reset instead of return */

/* params.status (written by the handler) */
#define RLD_STATUS_NOT_RUN      0
#define RLD_STATUS_LAUNCHING    1   /* every check passed; GETSEC[SENTER] is next */
#define RLD_STATUS_RETURNED     2   /* a check failed; returned to the decompressor */
#define RLD_STATUS_RESETTING    3   /* a check failed with require_drtm; platform reset */

/* params.out_flags */
#define RLD_OUT_INTEL_INFO_CHANGED  (1u << 0)  /* MSRs differ from the staged INTEL_INFO */
#define RLD_OUT_BIOS_SINIT          (1u << 1)  /* the BIOS copy at TXT.SINIT.BASE was used */

/*
 * Reason codes. A reset leaves 0xC000C000 | reason in TXT.ERRORCODE (bit 31 valid,
 * bit 30 software, bit 15 MLE; bit 14 set keeps them apart from Secure Launch's own
 * 0xC0008xxx codes, drtm.md 2.3). Stable: relaunchd decodes them by number.
 */
#define RLD_REASON_NONE                 0
#define RLD_REASON_BAD_CONTEXT          1
#define RLD_REASON_NOT_BSP              2
#define RLD_REASON_NO_SMX               3
#define RLD_REASON_FEATURE_CONTROL      4
#define RLD_REASON_TXT_RESET_PENDING    5
#define RLD_REASON_TXT_ERROR            6
#define RLD_REASON_SENTER_DONE          7
#define RLD_REASON_HEAP_INVALID         8
#define RLD_REASON_BIOS_DATA_VERSION    9
#define RLD_REASON_CPU_COUNT            10
#define RLD_REASON_HEAP_TOO_SMALL       11
#define RLD_REASON_GETSEC_CAPABILITIES  12
#define RLD_REASON_MLE_HEADER           13
#define RLD_REASON_MLE_CAPABILITIES     14
#define RLD_REASON_MLE_LOCATION         15
#define RLD_REASON_PTAB_TOO_SMALL       16
#define RLD_REASON_BEYOND_PMR           17
#define RLD_REASON_NO_SINIT             18
#define RLD_REASON_SINIT_TOO_LARGE      19
#define RLD_REASON_MTRR_COUNT           20
#define RLD_REASON_MACHINE_CHECK        21
#define RLD_REASON_TPM_NOT_TIS          22
#define RLD_REASON_TPM_LOCALITY         23
#define RLD_REASON_APIC                 24
#define RLD_REASON_EXCEPTION            25
#define RLD_REASON_SINIT_CAPABILITIES   26
#define RLD_REASON_MAX                  26

#define RLD_ERRORCODE_BASE              0xC000C000u

#ifndef __ASSEMBLER__
#include <stdint.h>

/* At offset 0 of txt-dl-handler.bin (64 bytes). */
struct rld_dl_header {
	char     magic[8];          /* "RLDTXTDL" */
	uint32_t abi_version;       /* RLD_DL_ABI_VERSION */
	uint32_t header_size;       /* 64 */
	uint32_t entry_offset;      /* dl_launch, the v16 DL_INFO.dl_launch target */
	uint32_t image_size;        /* bytes in the file */
	uint32_t memory_size;       /* bytes the segment needs: image + zeroed bss */
	uint32_t params_offset;     /* struct rld_dl_params inside the image */
	uint32_t params_size;
	uint32_t slrt_layout;       /* 16 */
	uint32_t align;             /* required load alignment */
	uint32_t reserved[5];
} __attribute__((packed));

/*
 * Filled by relaunchd when it stages the handler (all addresses physical, below
 * 4 GiB); DL_INFO.bl_context.context points here. The last five fields are the
 * handler's own report.
 */
struct rld_dl_params {
	uint64_t magic;                 /*   0 RLD_PARAMS_MAGIC */
	uint32_t version;               /*   8 */
	uint32_t size;                  /*  12 */
	uint32_t flags;                 /*  16 RLD_FLAG_* */
	uint32_t os_sinit_caps;         /*  20 OsSinitData.Capabilities to request */
	uint64_t slrt;                  /*  24 the SLRT */
	uint64_t dl_info;               /*  32 its DL_INFO entry */
	uint64_t intel_info;            /*  40 its INTEL_INFO entry (OsMleData.txt_info) */
	uint64_t sinit;                 /*  48 relaunchd's copy of the SINIT ACM, 0: none */
	uint64_t sinit_size;            /*  56 its exact size (AcmHeader.Size * 4) */
	uint64_t kernel_base;           /*  64 the kexec kernel segment; the MLE lies in it */
	uint64_t kernel_size;           /*  72 */
	uint64_t mle_ptab;              /*  80 MLE page tables, directly below kernel_base */
	uint64_t mle_ptab_size;         /*  88 */
	uint64_t ap_wake_block;         /*  96 OsMleData.ap_wake_block */
	uint64_t ap_wake_block_size;    /* 104 */
	uint64_t event_log;             /* 112 DRTM event log (LOG_INFO, heap element 8) */
	uint64_t event_log_size;        /* 120 */
	uint64_t pmr_lo_base;           /* 128 OsSinitData VT-d PMRs */
	uint64_t pmr_lo_size;           /* 136 */
	uint64_t pmr_hi_base;           /* 144 */
	uint64_t pmr_hi_size;           /* 152 */
	uint64_t rsdp;                  /* 160 OsSinitData.EfiRsdtPtr, 0 on a BIOS boot */
	uint32_t os_sinit_flags;        /* 168 OsSinitData.Flags */
	uint32_t min_mle_version;       /* 172 lowest MLE header version to accept */
	uint32_t status;                /* 176 RLD_STATUS_* (out) */
	uint32_t reason;                /* 180 RLD_REASON_* (out) */
	uint64_t detail;                /* 184 the value that failed the check (out) */
	uint32_t step;                  /* 192 last step reached (out) */
	uint32_t out_flags;             /* 196 RLD_OUT_* (out) */
} __attribute__((packed));

_Static_assert(sizeof(struct rld_dl_header) == RLD_DL_HEADER_SIZE, "header size");
_Static_assert(sizeof(struct rld_dl_params) == RLD_PARAMS_SIZE, "params size");
#endif /* !__ASSEMBLER__ */

#endif /* RLD_DL_ABI_H */
