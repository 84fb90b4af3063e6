"""The `txt` method (relaunchd.launch.txt): what a TXT launch is built from — the SINIT ACM
that fits the chipset, the DL handler and INTEL_INFO as the CPU's MSRs are now (read from
/dev/cpu/0/msr, offset = MSR index, msr(4)) — gathered only on a machine whose verdict is
ready, from where the *configured* probe looks (issue #16: staging once ignored the
configured ACM directories)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.errors import InvalidDlHandler, NotReady
from relaunchd.launch.protocol import LaunchRequest
from relaunchd.launch.txt import TxtMethod
from relaunchd.platform import readiness
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot

# Intel SDM vol. 4: IA32_MTRRCAP 0xFE (VCNT 0 here: in a file, 8-byte reads at adjacent
# offsets overlap, so the variable-MTRR pairs 0x200… are left to tests/unit/formats/
# test_slrt.py::test_intel_info_from_msrs), IA32_MISC_ENABLE 0x1A0, IA32_MTRR_DEF_TYPE 0x2FF
MSRS = {0xFE: 0x0D00, 0x1A0: 0x850089, 0x2FF: 0xC06}
HEAP_BASE = 0x7A380000          # the fixture's TXT.HEAP.BASE (fixtures/…/binary.txt)


@pytest.fixture
def server(tmp_path) -> Path:
    root = materialize("intel-txt-server", tmp_path)
    fd = os.open(root / "dev/cpu/0/msr", os.O_WRONLY)
    try:
        for index, value in MSRS.items():
            os.pwrite(fd, struct.pack("<Q", value), index)
    finally:
        os.close(fd)
    return root


def request(root: Path, **kw) -> LaunchRequest:
    probe = kw.pop("probe", ProbeConfig(root=str(root)))
    return LaunchRequest(SysRoot(str(root)), probe, **kw)


def test_a_ready_server_gives_the_acm_the_handler_and_intel_info(server):
    inputs = TxtMethod().segment_inputs(request(server))
    assert inputs.txt.acm == (server / "boot/SPR_SINIT_v1.2.BIN").read_bytes()  # the one that fits
    shipped = (server / "usr/lib/relaunchd/txt-dl-handler.bin").read_bytes()
    assert inputs.txt.handler_sha256 == hashlib.sha256(shipped).hexdigest()
    info = inputs.intel_info
    assert info.txt_heap == HEAP_BASE
    assert (info.saved_misc_enable, info.default_mem_type) == (MSRS[0x1A0], MSRS[0x2FF])
    assert info.variable_mtrrs == ()                      # MTRRCAP[7:0] = 0


def test_explicit_files_override_what_the_probe_picks(server):
    (server / "opt").mkdir()
    shipped = (server / "usr/lib/relaunchd/txt-dl-handler.bin").read_bytes()
    (server / "opt/handler.bin").write_bytes(shipped)
    # A copy of the ACM that fits, where the probe does not look, with one byte of its
    # (unchecked) tail changed so the bytes show which file was taken.
    acm = bytearray((server / "boot/SPR_SINIT_v1.2.BIN").read_bytes())
    acm[-1] ^= 0xFF
    (server / "opt/chosen.bin").write_bytes(acm)
    inputs = TxtMethod().segment_inputs(request(
        server, sinit_acm="/opt/chosen.bin", dl_handler="/opt/handler.bin"))
    assert inputs.txt.acm == bytes(acm)
    assert inputs.txt.handler_path.endswith("/opt/handler.bin")


def test_a_handler_that_is_not_relaunchds_is_refused(server):
    (server / "opt").mkdir()
    (server / "opt/handler.bin").write_bytes(b"\x90" * 64)
    with pytest.raises(InvalidDlHandler, match="not relaunchd's TXT DL handler"):
        TxtMethod().segment_inputs(request(server, dl_handler="/opt/handler.bin"))


def test_the_configured_acm_directories_are_where_it_looks(server):
    (server / "opt/acm").mkdir(parents=True)
    for name in ("SPR_SINIT_v1.2.BIN", "ADL_SINIT_v1.0.BIN"):
        (server / "boot" / name).rename(server / "opt/acm" / name)
    configured = ProbeConfig(root=str(server), acm_dirs=("/opt/acm",))
    inputs = TxtMethod().segment_inputs(request(server, probe=configured))
    assert inputs.txt.acm == (server / "opt/acm/SPR_SINIT_v1.2.BIN").read_bytes()
    with pytest.raises(NotReady, match=r"sinit-acm-missing"):
        TxtMethod().segment_inputs(request(server))     # the default places: none there


def test_a_machine_that_is_not_ready_is_refused_with_its_reasons(tmp_path):
    laptop = materialize("intel-laptop-ptt", tmp_path)
    with pytest.raises(NotReady) as info:
        TxtMethod().segment_inputs(request(laptop))
    assert "[tpm-crb]" in str(info.value) and "[sinit-acm-missing]" in str(info.value)


def test_an_unreadable_msr_is_not_guessed(server):
    os.truncate(server / "dev/cpu/0/msr", 0x110)     # FEATURE_CONTROL and MTRRCAP still there
    with pytest.raises(NotReady, match="cannot read MSR 0x1a0"):
        TxtMethod().segment_inputs(request(server))


def test_an_unreadable_handler_is_named(server):
    with pytest.raises(NotReady,
                       match="cannot open the TXT DL handler .*/opt/none.bin: No such file"):
        TxtMethod().segment_inputs(request(server, dl_handler="/opt/none.bin"))


def test_the_verdict_is_the_probes(server):
    facts = readiness.read_facts(ProbeConfig(root=str(server)))
    verdict = TxtMethod().verdict(facts)
    assert verdict.ready and verdict.method == "txt"
    assert {"cpu-smx", "txt-enabled-firmware", "txt-registers", "sinit-acm", "dl-handler",
            "iommu-active", "tpm-tis"} <= {c.id for c in verdict.checks}
