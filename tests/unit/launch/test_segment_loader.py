"""The Secure Launch segment loader's plan (relaunchd.launch.segment_loader) for Debian's
kernel on a fixture root with a 2 GiB QEMU guest's firmware memory map: the segments it
adds (the DRTM log, reserved in the new kernel's e820), the SLRT it builds from where they
landed (DL_INFO, LOG_INFO, the measurement policy, INTEL_INFO; drtm.md §1.2–§1.4), the
RSDP from the EFI system table, and the predicted sealing events. `load` (the syscall) is
never called here.

The zero page is read at the offsets Documentation/arch/x86/zero-page.rst gives (0x070
acpi_rsdp_addr, 0x1E8 e820_entries, 0x2D0 e820_table of 20-byte entries) and 0x078
slr_table_addr of the Secure Launch v16 series (drtm.md §2)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from relaunchd.errors import Unsupported
from relaunchd.formats import slrt
from relaunchd.formats.pe import FileRange
from relaunchd.launch import segment_loader
from relaunchd.launch.segment_loader import LOG_SIZE, SegmentInputs
from relaunchd.platform.sysroot import SysRoot
from support.memmaps import QEMU_2G, write_memmap

CMDLINE = b"console=ttyS0 root=/dev/vda1 relaunchd.id=5e9"
E820_RESERVED = 2
GiB = 1 << 30


@pytest.fixture(scope="module")
def kernel(debian_kernel):
    fd = os.open(debian_kernel.vmlinuz, os.O_RDONLY)
    yield FileRange(fd, 0, os.fstat(fd).st_size)
    os.close(fd)


@pytest.fixture
def root(tmp_path) -> Path:
    write_memmap(tmp_path, QEMU_2G)
    return tmp_path


def e820(zero_page: bytes) -> list[tuple[int, int, int]]:
    count = zero_page[0x1E8]
    return [struct.unpack_from("<QQI", zero_page, 0x2D0 + 20 * i) for i in range(count)]


def entries(table: bytes) -> dict[type, object]:
    return {type(e): e for e in slrt.parse(table).entries}


def test_a_rehearsal_plan(kernel, root):
    plan, content = segment_loader.plan(kernel, None, CMDLINE, SysRoot(str(root)),
                                        SegmentInputs())
    seg = {s.name: s for s in plan.segments}
    zp = plan.zero_page
    # The table the kernel finds through 0x078 is the one built, inside setup_data.
    assert struct.unpack_from("<Q", zp, 0x078)[0] == plan.slrt_address
    setup = seg["setup-data"]
    start = plan.slrt_address - setup.address
    assert bytes(setup.data)[start:start + len(content.table)] == content.table
    found = entries(content.table)
    dl = found[slrt.DlInfo]
    assert (dl.dce_base, dl.dce_size, dl.dl_launch) == (0, 0, 0)      # no DCE: a rehearsal
    # The MLE's size and entry come from the kernel's own MLE header, which exists only
    # after decompression: the DL handler fills them in (docs/slrt-policy.md).
    assert dl.dlme_base == seg["kernel"].address and (dl.dlme_size, dl.dlme_entry) == (0, 0)
    assert dl.dlme_config_table == plan.zero_page_address
    log = found[slrt.LogInfo]
    assert (log.addr, log.size) == (seg["drtm-log"].address, LOG_SIZE)
    assert found[slrt.IntelInfo].boot_params_addr == plan.zero_page_address
    # The DRTM log survives into the new kernel: reserved in its e820.
    assert any(kind == E820_RESERVED and a <= log.addr and log.addr + LOG_SIZE <= a + n
               for a, n, kind in e820(zp))
    # The policy measures the command line where it was placed, NUL-less (drtm.md §1.6).
    cmd = next(p for p in found[slrt.EntryPolicy].entries if p.entity_type == slrt.ET_CMDLINE)
    assert (cmd.entity, cmd.size) == (seg["cmdline"].address, len(slrt.measured_cmdline(CMDLINE)))
    assert content.policy == found[slrt.EntryPolicy]
    assert content.seal_pcr == slrt.SEAL_PCR and content.layout == slrt.LAYOUT_V16


# A txt plan (the ACM, the handler and its parameter block, the MLE page tables, the AP
# wake block, below the low PMR) is staged from the real handler and checked field by
# field, then run to GETSEC[SENTER], in tests/integration/test_txt_stage.py.


def test_without_a_firmware_memory_map(kernel, tmp_path):
    with pytest.raises(Unsupported, match="CONFIG_FIRMWARE_MEMMAP"):
        segment_loader.plan(kernel, None, CMDLINE, SysRoot(str(tmp_path)), SegmentInputs())


@pytest.mark.parametrize(("systab", "rsdp"), [
    ("MPS=0xfc6f0\nACPI20=0x7fb7e014\nACPI=0x7fb7e000\nSMBIOS=0x7f9ff000\n", 0x7FB7E014),
    ("ACPI=0xf5a40\nSMBIOS=0xf5b10\n", 0xF5A40),
    ("SMBIOS=0xf5b10\n", 0),
    (None, 0),                                   # a BIOS boot: no EFI system table
])
def test_the_rsdp_from_the_efi_system_table(kernel, root, systab, rsdp):
    if systab is not None:
        (root / "sys/firmware/efi").mkdir(parents=True)
        (root / "sys/firmware/efi/systab").write_text(systab)
    assert segment_loader.acpi_rsdp(SysRoot(str(root))) == rsdp
    plan, _ = segment_loader.plan(kernel, None, CMDLINE, SysRoot(str(root)), SegmentInputs())
    assert struct.unpack_from("<Q", plan.zero_page, 0x070)[0] == rsdp


def test_predicted_events_are_the_sealing_pcrs(kernel, root):
    _, content = segment_loader.plan(kernel, None, CMDLINE, SysRoot(str(root)),
                                     SegmentInputs())
    events = segment_loader.predicted_events(content, cmdline=CMDLINE, initrd_digests=None)
    assert events and all(e.pcr == slrt.SEAL_PCR for e in events)
    by_label = {e.label: e for e in events}
    cmdline_event = next(e for label, e in by_label.items() if "command line" in label)
    assert cmdline_event.digests["sha256"] == hashlib.sha256(
        slrt.measured_cmdline(CMDLINE)).digest()
    amd = segment_loader.SlrtContent(content.table, content.policy, None, content.seal_pcr,
                                     content.layout)
    assert segment_loader.predicted_events(amd, cmdline=CMDLINE, initrd_digests=None) == []
