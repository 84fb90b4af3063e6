"""The Intel TXT DL handler at stage time: load and check the installed binary and the
SINIT ACM, lay out what the handler needs next to the kernel, and fill its
parameter block once every address is known (docs/drtm.md).

The handler (built from launch/dl_handler/, installed at INSTALLED) is staged as
its own kexec segment below 4 GiB; DL_INFO.dl_launch points at its entry and
DL_INFO.bl_context.context at its parameter block. Beside it relaunchd stages:
  * "sinit"     relaunchd's copy of the SINIT ACM, exact size; the handler copies
                it to TXT.SINIT.BASE unless the BIOS copy there is as new;
  * "mle-ptab"  the MLE page tables, directly below the kernel (tboot and GRUB put
                them there; v16's sl_stub also reuses two of these pages);
  * "ap-wake"   the AP wake block, reserved in the next kernel's e820 (v16 parks the
                APs there after the launch; GRUB's size, 0x14000).
The DRTM event log ("drtm-log") is the segment loader's, shared with the SLRT.

The lead moves `_launch_inputs`/`_intel_info` into a launch/txt.py method module;
everything TXT-specific they call lives here so that move is mechanical.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from relaunchd.errors import InvalidDlHandler, NoRoom, NotReady
from relaunchd.formats import acm as acmfmt
from relaunchd.formats import slrt
from relaunchd.formats import txt_dl_handler as dlh
from relaunchd.formats.x86 import segment_plan
from relaunchd.formats.x86.memory_ranges import FOUR_GIB, MemoryMap

INSTALLED = "/usr/lib/relaunchd/txt-dl-handler.bin"
HANDLER = "dl-handler"
SINIT = "sinit"
MLE_PTAB = "mle-ptab"
AP_WAKE = "ap-wake"
AP_WAKE_BLOCK_SIZE = 0x14000          # GRUB's GRUB_MLE_AP_WAKE_BLOCK_SIZE
PMR_ALIGN = 2 << 20                   # VT-d PMR granularity GRUB uses (GRUB_TXT_PMR_ALIGN)
OS_SINIT_FLAGS_MAX_PERFORMANCE = 1    # SDG Appendix C OsSinitData.Flags bit 0, as GRUB sets
PAGE = 4096


@dataclass(frozen=True)
class TxtLaunch:
    """What a TXT launch stages besides the kernel, checked and ready."""

    handler: dlh.HandlerImage
    handler_path: str
    handler_sha256: str          # of the file as installed (before the parameter block)
    acm: bytes
    acm_module: acmfmt.Acm
    os_sinit_caps: int
    require_drtm: bool = False
    rsdp: int = 0


@dataclass(frozen=True)
class Pmrs:
    """OsSinitData's VT-d protected memory ranges (SDG Appendix C; drtm.md §2.6)."""

    lo_base: int
    lo_size: int
    hi_base: int
    hi_size: int


def read_root_file(path: str, limit: int, what: str) -> bytes:
    """A file relaunchd trusts (the handler, a SINIT ACM): the path resolved once,
    then every component opened by descriptor without following links; the file
    and the directory holding it must be root's and not writable by others."""
    real = os.path.realpath(path)
    parts = [p for p in real.split("/") if p]
    if not parts:
        raise NotReady(f"{what} {path!r} is not a file")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, flags | (0 if last else os.O_DIRECTORY), dir_fd=fd)
            except OSError as exc:
                raise NotReady(f"cannot open {what} {path}: {exc.strerror}") from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if i >= len(parts) - 2 and (st.st_uid != 0 or st.st_mode & (stat.S_IWGRP |
                                                                        stat.S_IWOTH)):
                raise NotReady(f"{what} {path}: /{'/'.join(parts[:i + 1])} must be owned by "
                               "root and not writable by others")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotReady(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise NotReady(f"{what} {path} is {st.st_size} bytes, more than {limit}")
        data = os.read(fd, limit + 1)
        if len(data) != st.st_size:
            raise NotReady(f"{what} {path} changed while it was read")
        return data
    finally:
        os.close(fd)


def load_handler(path: str = INSTALLED) -> tuple[dlh.HandlerImage, str]:
    """The handler binary, validated, and the SHA-256 of the file as installed."""
    data = read_root_file(path, dlh.MAX_IMAGE, "the TXT DL handler")
    try:
        image = dlh.parse(data)
    except InvalidDlHandler as exc:
        raise InvalidDlHandler(f"{path}: {exc}") from None
    return image, hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PlatformIds:
    """What an ACM is matched against (readiness facts)."""

    didvid: int | None
    production_fused: bool | None
    fms: int | None


def check_acm(data: bytes, path: str, ids: PlatformIds) -> acmfmt.Acm:
    """A SINIT ACM for `stage --sinit-acm F`: refused, with the reason id `check` gives
    for the same file, unless it fits this platform and a v16 launch."""
    try:
        module = acmfmt.parse(data)
    except acmfmt.InvalidAcm as exc:
        raise NotReady(f"{path}: not a usable ACM: {exc} [sinit-acm-invalid]") from None
    if ids.didvid is None:
        raise NotReady(f"{path}: the chipset ID (TXT.DIDVID) is unknown, so the ACM cannot "
                       "be matched [sinit-acm-unverified]")
    fit = acmfmt.platform_fit(module, vendor_id=ids.didvid & 0xFFFF,
                              device_id=(ids.didvid >> 16) & 0xFFFF,
                              revision_id=(ids.didvid >> 32) & 0xFFFF,
                              production_fused=ids.production_fused, fms=ids.fms)
    if not fit.fits:
        raise NotReady(f"{path}: {fit.message} [{fit.reason}]")
    if module.header.size != len(data):
        raise NotReady(f"{path}: the file has {len(data)} bytes, the ACM header says "
                       f"{module.header.size} [sinit-acm-invalid]")
    if module.info.os_sinit_data_version < 7:
        raise NotReady(f"{path}: the ACM takes OsSinitData up to version "
                       f"{module.info.os_sinit_data_version}; a TPM 2.0 launch writes "
                       "version 7 [sinit-acm-too-old]")
    return module


def prepare(handler_path: str, acm_path: str, ids: PlatformIds, *,
            require_drtm: bool = False, rsdp: int = 0) -> TxtLaunch:
    """Everything a TXT stage needs from disk, checked before any other work."""
    handler, digest = load_handler(handler_path)
    acm_data = read_root_file(acm_path, acmfmt.MAX_MODULE, "the SINIT ACM")
    module = check_acm(acm_data, acm_path, ids)
    try:
        caps = acmfmt.os_sinit_capabilities(module.info)
    except acmfmt.InvalidAcm as exc:
        raise NotReady(f"{acm_path}: {exc} [sinit-acm-capabilities]") from None
    return TxtLaunch(handler, handler_path, digest, acm_data, module, caps, require_drtm, rsdp)


def pmrs(memmap: MemoryMap) -> Pmrs:
    """The low PMR from 0 (v16 requires base 0: SL_ERROR_LO_PMR_BASE) up to the highest
    RAM below 4 GiB, the high PMR over RAM above it, both in 2 MiB steps (GRUB)."""
    ram = memmap.ram()
    low_top = max((min(end, FOUR_GIB) for start, end in ram if start < FOUR_GIB), default=0)
    high = [(max(start, FOUR_GIB), end) for start, end in ram if end > FOUR_GIB]
    lo_size = low_top // PMR_ALIGN * PMR_ALIGN
    if not high:
        return Pmrs(0, lo_size, 0, 0)
    hi_base = -(-min(s for s, _ in high) // PMR_ALIGN) * PMR_ALIGN
    hi_end = max(e for _, e in high) // PMR_ALIGN * PMR_ALIGN
    return Pmrs(0, lo_size, hi_base, max(0, hi_end - hi_base))


def mle_ptab_size(kernel_memsz: int) -> int:
    """PDPT + PD + one page table per 2 MiB: enough for any MLE inside the kernel
    segment (the handler checks the real MLE size against it)."""
    pages = -(-kernel_memsz // PAGE)
    return (2 + -(-pages // 512)) * PAGE


def blobs(launch: TxtLaunch, kernel_memsz: int,
          fill_params: Callable[[Mapping[str, tuple[int, int]]], bytes]) -> list[
              segment_plan.SegmentRequest]:
    """The segments a TXT launch adds (module docstring)."""
    h = launch.handler.header
    return [
        segment_plan.SegmentRequest(name=SINIT, data=launch.acm, align=PAGE),
        segment_plan.SegmentRequest(name=HANDLER, data=launch.handler.data, memsz=h.memory_size,
                          align=h.align, fill=fill_params),
        segment_plan.SegmentRequest(name=MLE_PTAB, data=b"", memsz=mle_ptab_size(kernel_memsz),
                          below_kernel=True),
        segment_plan.SegmentRequest(name=AP_WAKE, data=b"", memsz=AP_WAKE_BLOCK_SIZE, reserve=True),
    ]


def dl_info(launch: TxtLaunch, addresses: Mapping[str, tuple[int, int]], *,
            kernel: str, zero_page: str) -> slrt.DlInfo:
    """DL_INFO as staged. The DCE is relaunchd's ACM copy, exactly its size; the
    handler rewrites dce_* to the copy SENTER uses and dlme_size, dlme_entry and
    dlme_header_offset from the kernel's own MLE header, which exists only after
    decompression (the kexec segment also holds the decompression area)."""
    handler = addresses[HANDLER][0]
    return slrt.DlInfo(
        dce_base=addresses[SINIT][0], dce_size=len(launch.acm),
        dlme_base=addresses[kernel][0], dlme_size=0, dlme_entry=0,
        dl_launch=handler + launch.handler.header.entry_offset,
        bl_context=slrt.BlContext(slrt.BOOTLOADER_GRUB,
                                  handler + launch.handler.header.params_offset),
        dlme_config_table=addresses[zero_page][0])


def params(launch: TxtLaunch, addresses: Mapping[str, tuple[int, int]], table: slrt.Table,
           memmap: MemoryMap, *, kernel: str, log: str) -> dlh.Params:
    """The handler's parameter block once every segment is placed; refuses a layout
    the v16 kernel would reset on (everything inside the low PMR)."""
    slrt_base = addresses[segment_plan.SLRT][0]
    pmr = pmrs(memmap)
    for name, (addr, size) in addresses.items():
        if addr + size > pmr.lo_base + pmr.lo_size and addr < FOUR_GIB:
            raise NoRoom(f"{name} at 0x{addr:x}+0x{size:x} is above the low PMR "
                         f"(0x{pmr.lo_size:x}); a Secure Launch kernel would refuse it")
    return dlh.Params(
        flags=dlh.FLAG_REQUIRE_DRTM if launch.require_drtm else 0,
        os_sinit_caps=launch.os_sinit_caps,
        slrt=slrt_base,
        dl_info=slrt_base + slrt.entry_offset(table, slrt.TAG_DL_INFO),
        intel_info=slrt_base + slrt.entry_offset(table, slrt.TAG_INTEL_INFO),
        sinit=addresses[SINIT][0], sinit_size=len(launch.acm),
        kernel_base=addresses[kernel][0], kernel_size=addresses[kernel][1],
        mle_ptab=addresses[MLE_PTAB][0], mle_ptab_size=addresses[MLE_PTAB][1],
        ap_wake_block=addresses[AP_WAKE][0], ap_wake_block_size=addresses[AP_WAKE][1],
        event_log=addresses[log][0], event_log_size=addresses[log][1],
        pmr_lo_base=pmr.lo_base, pmr_lo_size=pmr.lo_size,
        pmr_hi_base=pmr.hi_base, pmr_hi_size=pmr.hi_size,
        rsdp=launch.rsdp, os_sinit_flags=OS_SINIT_FLAGS_MAX_PERFORMANCE,
        min_mle_version=launch.acm_module.info.min_mle_header_version)


def platform_ids(report) -> PlatformIds:
    """The chipset and CPU identity from a readiness report (platform/readiness.py)."""
    regs = report.facts.get("txt.registers")
    value = regs.value if regs is not None and regs.ok and isinstance(regs.value, dict) else {}
    model = report.facts.get("cpu.model")
    cpu = model.value if model is not None and model.ok and isinstance(model.value, dict) else {}
    didvid = int(value["didvid"], 16) if value.get("didvid") else None
    production = value.get("production_fused")
    return PlatformIds(didvid, production if isinstance(production, bool) else None,
                       int(cpu["fms"], 16) if cpu.get("fms") else None)
