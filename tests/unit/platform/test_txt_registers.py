"""TXT register decoding (relaunchd.platform.txt_registers): pure decoders and the
securityfs/devmem reader."""

from __future__ import annotations

import pytest

from relaunchd.platform import txt_registers
from relaunchd.platform.sysroot import SysRoot


def _space(**regs: int) -> bytes:
    buf = bytearray(txt_registers.PUB_READ)
    for name, value in regs.items():
        off = txt_registers.OFFSETS[name]
        buf[off:off + 8] = value.to_bytes(8, "little")
    return bytes(buf)


def test_public_space_decoding():
    regs = txt_registers.from_public_space(_space(sts=0x10003, ests=0x1, errorcode=0xC0008011,
                                        didvid=0x00000001B0058086, ver_emif=0x80000000,
                                        heap_base=0x7A380000, acm_policy_status=0x6000,
                                        e2sts=0x2))
    d = txt_registers.decode(regs)
    assert d["senter_done"] and d["sexit_done"] and d["locality2_open"]
    assert d["txt_reset"] is True
    assert d["error"] == "Secure Launch error 0x011 HEAP_INVALID_DMAR"
    assert d["chipset"] == {"vendor_id": "0x8086", "device_id": "0xb005",
                            "revision_id": "0x1", "id_ext": "0x0"}
    assert d["production_fused"] is True
    assert d["tpm_type"] == "PTT"
    assert d["secrets_in_memory"] is True
    assert d["heap_base"] == "0x7a380000"


def test_width_masks():
    # ESTS is 8 bits and ERRORCODE 32: neighbouring bytes must not leak in.
    buf = bytearray(_space())
    buf[0x008:0x010] = bytes([1, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA])
    regs = txt_registers.from_public_space(bytes(buf))
    assert regs.ests == 1


@pytest.mark.parametrize("value, valid, success, text", [
    (0, False, False, "no error recorded"),
    (0xC0000001, True, True, "last ACM run succeeded"),
    (0xC0008024, True, False, "Secure Launch error 0x024 SLRT_MAP"),
    (0xC0008FFF, True, False, "Secure Launch error 0xfff unknown"),
    (0x00000005, False, False, "no valid error (bit 31 clear)"),
    (0xC0001C21, True, False, "ACM error (SINIT): class 0x2, major 0x7, minor 0x0"),
    (0x80000003, True, False, "processor error type 0x3"),
])
def test_errorcode(value, valid, success, text):
    e = txt_registers.decode_errorcode(value)
    assert (e.valid, e.success, e.text) == (valid, success, text)


def test_space_absent():
    assert txt_registers.space_is_absent(b"\xff" * txt_registers.PUB_READ)
    assert txt_registers.space_is_absent(bytes(txt_registers.PUB_READ))
    assert not txt_registers.space_is_absent(_space(sts=2))
    with pytest.raises(ValueError):
        txt_registers.from_public_space(b"\x00" * 16)


def test_securityfs_preferred_over_devmem(tmp_path):
    d = tmp_path / "sys/kernel/security/slaunch/txt"
    d.mkdir(parents=True)
    for name, text in {"sts": "0x0000000000010001", "ests": "0x00",
                       "errorcode": "0xc0000001", "didvid": "0x00000001b0058086",
                       "ver_emif": "0x80000000", "scratchpad": "0x0000000000004000",
                       "e2sts": "0x0000000000000002"}.items():
        (d / name).write_text(text + "\n")
    got = txt_registers.read_registers(SysRoot(str(tmp_path)))
    assert got.ok and got.path == txt_registers.SECURITYFS_DIR
    assert got.value.sts == 0x10001 and got.value.acm_policy_status == 0x4000
    assert txt_registers.decode(got.value)["senter_done"] is True


def test_securityfs_garbage_and_devmem_errors(tmp_path):
    d = tmp_path / "sys/kernel/security/slaunch/txt"
    d.mkdir(parents=True)
    (d / "sts").write_text("banana\n")
    got = txt_registers.read_registers(SysRoot(str(tmp_path)))
    assert got.error == "garbage"
    (d / "sts").unlink()
    got = txt_registers.read_registers(SysRoot(str(tmp_path)))   # falls back to /dev/mem: absent
    assert (got.path, got.error) == ("/dev/mem", "not-present")
    (tmp_path / "dev").mkdir()
    with open(tmp_path / "dev/mem", "wb") as f:
        f.seek(txt_registers.PUB_BASE)
        f.write(b"\xff" * txt_registers.PUB_READ)
    got = txt_registers.read_registers(SysRoot(str(tmp_path)))
    assert got.error == "garbage" and got.detail == txt_registers.ABSENT_DETAIL
