"""`stage --method txt --dry-run` on the intel-txt-server fixture, end to end: the
real signed UKI, the shipped DL handler, the fixture's SINIT ACM; then the staged
segments themselves loaded into the emulated TXT machine and run to GETSEC[SENTER]
(the decompressed kernel replaced by one carrying a v16 MLE header, which is what
the v16 decompressor leaves at the kernel segment's base)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest

from fixtures.platforms.build import materialize
from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.stage import record_for
from relaunchd.errors import NotReady
from relaunchd.formats import slrt
from relaunchd.formats import txt_dl_handler as dlh
from relaunchd.formats.pe import FileRange
from relaunchd.launch import staging
from relaunchd.platform import image_files, readiness
from relaunchd.platform.sysroot import Read, SysRoot
from relaunchd.platform.trust_store import load_certificates
from support.memmaps import QEMU_2G, write_memmap
from support.txt_machine import Platform, TxtMachine
from support.txt_scenario import HANDLER_BIN, Layout, v16_mle_header

pytestmark = pytest.mark.skipif(not HANDLER_BIN.exists(),
                                reason="run `make setup` to build the DL handler")

# The CPU the fixture models (Intel SDM vol. 3A 12.11): MTRRcap VCNT 2, MISC_ENABLE,
# MTRRdefType E=1 FE=1 WB, 0-2 GiB WB and 2-3 GiB UC for 39 physical address bits.
MSRS = {0xFE: 0x502, 0x1A0: 0x851889, 0x2FF: 0xC06, 0x200: 0x6, 0x201: 0x7F80000800,
        0x202: 0x80000000, 0x203: 0x7FC0000800}
SERVER_ACM = "/boot/SPR_SINIT_v1.2.BIN"


class MsrRoot(SysRoot):
    """/dev/cpu/0/msr takes the MSR number as the offset, which a plain fixture file
    cannot hold for consecutive MSRs: served from MSRS."""

    def read_at(self, path, offset, size):
        if path == readiness.MSR_DEV and offset in MSRS and size == 8:
            return Read(path, MSRS[offset].to_bytes(8, "little"))
        return super().read_at(path, offset, size)


@pytest.fixture
def server(tmp_path, real_ukis, keys):
    root = materialize("intel-txt-server", tmp_path / "platform")
    write_memmap(root, QEMU_2G)
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    shutil.copy(real_ukis["signed"], images / "signed.efi")

    def options(**kw) -> staging.StageOptions:
        kw.setdefault("sinit_acm", SERVER_ACM)        # paths under the root
        kw.setdefault("dl_handler", "/usr/lib/relaunchd/txt-dl-handler.bin")
        return staging.StageOptions(
            method="txt", root=MsrRoot(str(root)),
            policy=image_files.ImagePolicy((str(images),)),
            trusted=load_certificates([str(keys["db"].cert)]), **kw)

    return root, images / "signed.efi", options


def test_sinit_acm_for_another_chipset_is_refused(server):
    root, image, options = server
    with pytest.raises(NotReady, match=r"does not list this chipset .*\[sinit-acm-mismatch\]"):
        staging.prepare(str(image), options(sinit_acm="/boot/ADL_SINIT_v1.0.BIN"))


def test_sinit_acm_without_what_v16_needs_is_refused(server, tmp_path):
    from fixtures.platforms.build import build_acm

    root, image, options = server
    old = root / "boot/OLD_SINIT.BIN"
    old.write_bytes(build_acm(fms=0x806F0, caps=0x3E0))      # no ECX page tables, no wake
    with pytest.raises(NotReady, match=r"MLE page tables in ECX.*\[sinit-acm-capabilities\]"):
        staging.prepare(str(image), options(sinit_acm="/boot/OLD_SINIT.BIN"))


def test_dl_handler_that_is_not_ours_is_refused(server, tmp_path):
    from relaunchd.errors import InvalidDlHandler

    root, image, options = server
    fake = root / "usr/lib/relaunchd/other.bin"
    fake.write_bytes(b"\x90" * 4096)
    with pytest.raises(InvalidDlHandler, match="not relaunchd's TXT DL handler"):
        staging.prepare(str(image), options(dl_handler="/usr/lib/relaunchd/other.bin"))


def test_dry_run_stages_the_handler_and_it_runs_to_senter(server, tmp_path):
    root, image, options = server
    staged = staging.prepare(str(image), options(require_drtm=True))
    out = tmp_path / "out"
    try:
        staging.write_artifacts(staged, str(out))
        # The handler file is one of the items relaunchd extends into its PCR at the
        # relaunch (engine.relaunch.MEASURED_ITEMS), hashed from the file as shipped.
        measured = HostMachine(MsrRoot(str(root)), readiness.ProbeConfig(root=str(root))
                               ).digests(staged, ("sha256", "sha384"))
        recorded = record_for(staged).dl_handler
        segments = {}
        for seg in staged.segment_plan.segments:
            data = seg.data
            if isinstance(data, FileRange):
                data = os.pread(data.fd, data.length, data.offset)
            segments[seg.name] = (seg.address, seg.memsz, bytes(data))
    finally:
        staged.close()

    plan = json.loads((out / "plan.json").read_text())
    acm_file = (root / SERVER_ACM.lstrip("/")).read_bytes()
    shipped = HANDLER_BIN.read_bytes()
    seg = {s["name"]: s for s in plan["segments"]["segments"]}
    assert plan["dl_handler"]["sha256"] == hashlib.sha256(shipped).hexdigest()
    assert measured["dl-handler"] == {"sha256": hashlib.sha256(shipped).hexdigest(),
                                      "sha384": hashlib.sha384(shipped).hexdigest()}
    assert recorded == {"path": plan["dl_handler"]["path"],
                        "sha256": plan["dl_handler"]["sha256"]}
    assert plan["dl_handler"]["address"] == seg["dl-handler"]["address"]

    # dl-handler.bin is the shipped binary with its parameter block filled in.
    staged_handler = (out / "dl-handler.bin").read_bytes()
    image_ = dlh.parse(staged_handler)
    off = image_.header.params_offset
    assert staged_handler[:off] == shipped[:off]
    assert staged_handler[off + dlh.PARAMS_SIZE:] == shipped[off + dlh.PARAMS_SIZE:]
    p = dlh.unpack_params(staged_handler[off:off + dlh.PARAMS_SIZE])
    assert p.flags == dlh.FLAG_REQUIRE_DRTM
    assert seg["dl-handler"]["memsz"] == image_.header.memory_size

    # The SLRT as staged (v16 byte offsets, patch 17/38).
    table_bytes = (out / "slrt.bin").read_bytes()
    slr_addr = plan["segments"]["slr_table_addr"]
    assert p.slrt == slr_addr and p.dl_info == slr_addr + 16
    dce_size, dce_base, dlme_size, dlme_base, dlme_entry = struct.unpack_from(
        "<5Q", table_bytes, 16 + 8)
    assert (dce_base, dce_size) == (seg["sinit"]["address"], len(acm_file))
    assert dce_size % 4096 != 0                      # exact, not the segment's memsz
    assert (dlme_base, dlme_size, dlme_entry) == (seg["kernel"]["address"], 0, 0)
    context, dl_launch = struct.unpack_from("<8xQQ", table_bytes, 16 + 64)
    assert context == seg["dl-handler"]["address"] + off
    assert dl_launch == seg["dl-handler"]["address"] + image_.header.entry_offset
    table = slrt.parse(table_bytes)
    initrd_entry = next(e for e in next(x for x in table.entries
                                        if isinstance(x, slrt.EntryPolicy)).entries
                        if e.entity_type == slrt.ET_RAMDISK)
    initrd_len = (out / "initrd").stat().st_size
    assert initrd_entry.size == initrd_len and initrd_entry.entity == seg["initrd"]["address"]

    # Where the handler's helpers went.
    assert p.mle_ptab + p.mle_ptab_size == seg["kernel"]["address"] == p.kernel_base
    assert seg["mle-ptab"]["address"] == p.mle_ptab
    assert (p.ap_wake_block, p.ap_wake_block_size) == (seg["ap-wake"]["address"], 0x14000)
    reserved = [e for e in plan["segments"]["e820"] if e["type"] == 2]
    assert any(e["addr"] <= p.ap_wake_block and p.ap_wake_block + 0x14000 <= e["addr"] +
               e["size"] for e in reserved), "the AP wake block must survive in the e820"
    assert (p.pmr_lo_base, p.pmr_lo_size, p.pmr_hi_size) == (0, 0x7FE00000, 0)
    assert p.os_sinit_caps == 0x226                  # D/A, MONITOR, ECX, TPM 2.0 log
    assert all(s["address"] + s["memsz"] <= p.pmr_lo_size for s in seg.values())

    # Run exactly these segments in the emulated server.
    plat = Platform(fms=0x000806F8, mtrr_vcnt=2, misc_enable=MSRS[0x1A0],
                    mtrr_def_type=MSRS[0x2FF],
                    variable_mtrrs=[(MSRS[0x200], MSRS[0x201]), (MSRS[0x202], MSRS[0x203])])
    m = TxtMachine(plat, ram=2 << 30)
    m.txt.update({0x110: 0x00000001B0058086, 0x200: 0x80000000, 0x270: 0x7A300000,
                  0x278: 0x80000, 0x300: 0x7A380000, 0x308: 0xE0000})
    for address, _memsz, data in segments.values():
        m.load(address, data)
    lay = Layout(kernel=p.kernel_base, kernel_size=p.kernel_size)
    mle = bytearray(lay.mle_end)
    mle[lay.mle_header_offset:lay.mle_header_offset + 52] = v16_mle_header(lay)
    m.load(p.kernel_base, bytes(mle))
    m.load(0x7A380000, struct.pack("<QIIQQIII", 8 + 36, 6, 0, 0, 0, 8, 0, 0))
    handler = seg["dl-handler"]["address"]
    outcome = m.call(handler + image_.header.entry_offset,
                     (handler, handler + image_.header.image_size), p.dl_info + 64,
                     (p.kernel_base, lay.mle_header_offset, 0))
    after = dlh.unpack_params(m.read(handler + off, dlh.PARAMS_SIZE))
    assert outcome.kind == "senter", (outcome.detail, dlh.reason(after.reason), hex(after.detail))
    r = outcome.regs
    assert (r["rbx"] & 0xFFFFFFFF, r["rcx"] & 0xFFFFFFFF) == (0x7A300000, len(acm_file))
    assert m.read(0x7A300000, len(acm_file)) == acm_file
    # The MSRs staging read are the ones the handler found: the prediction holds.
    assert not after.out_flags & dlh.OUT_INTEL_INFO_CHANGED
