"""PCR 11 arithmetic against the published test vectors (uki.md §2.1, §2.4)."""

from __future__ import annotations

import hashlib

from relaunchd.formats import pcr11


def sections(**contents: bytes) -> list[pcr11.MeasuredSection]:
    return [
        pcr11.MeasuredSection(
            name="." + name, size=len(data),
            digests={b: hashlib.new(b, data).digest() for b in pcr11.BANKS})
        for name, data in contents.items()
    ]


def test_documented_vectors():
    # uki.md §2.1: verified against systemd-measure 252
    pred = pcr11.predict(
        sections(linux=b"fake-kernel", osrel=b"ID=test\n", cmdline=b"quiet"), ("sha256",))
    assert pred.after_sections["sha256"].hex() == (
        "ff66e192e9cdc46c66e076f08a425705ee490e8aa1d41950ca80c263a4d4bbee")
    assert pred.phases["enter-initrd"]["sha256"].hex() == (
        "39a76d59a3f9a048daa77590a4a9242ef409715771f2cb6269eba6159bfa1f77")
    assert pred.phases["enter-initrd:leave-initrd:sysinit:ready"]["sha256"].hex() == (
        "c3049127610515e3d57b233025f8d79a40847c5016fcafc2388014a03aa0113b")
    alone = pcr11.predict(sections(linux=b"fake-kernel"), ("sha256",), phases=())
    assert alone.after_sections["sha256"].hex() == (
        "b93d09787c816d9e95a202165d7096a42f51fa86965a92c71a1727adedf9bfcd")


def test_measured_set_follows_stub_version():
    assert pcr11.measured_names(252) == (
        ".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey")
    assert ".uname" in pcr11.measured_names(254)
    assert ".ucode" not in pcr11.measured_names(255)
    assert ".profile" in pcr11.measured_names(257)
    assert ".pcrsig" not in pcr11.measured_names(None)


def test_order_is_enum_order_not_file_order():
    present = {".pcrpkey": 5, ".cmdline": 3, ".linux": 10, ".pcrsig": 9, ".uname": 4,
               ".initrd": 0}
    measured, skipped = pcr11.order_for_measurement(present, 252)
    assert measured == [".linux", ".cmdline", ".pcrpkey"]
    assert dict(skipped) == {".pcrsig": "never measured", ".initrd": "empty",
                             ".uname": "not measured by systemd-stub 252"}


def test_policy_pcr_digest_vector():
    # uki.md §2.4: the research reproduced systemd's unit-test vector 76532a0e…
    # for PCR 11 = all-zero sha256. Recompute from the documented formula.
    select = bytes([0x00, 0x08, 0x00])
    expected = hashlib.sha256(
        bytes(32) + (0x17F).to_bytes(4, "big")
        + (1).to_bytes(4, "big") + (0x0B).to_bytes(2, "big") + bytes([3]) + select
        + hashlib.sha256(bytes(32)).digest()).digest()
    assert pcr11.policy_pcr_digest("sha256", bytes(32)) == expected
    assert pcr11.policy_pcr_digest("sha1", bytes(20)) != expected


def test_pcrsig_parse_errors_are_named():
    import pytest

    for bad in (b"", b"[]", b"{\"sha256\": 1}", b"{\"sha256\": [{\"pcrs\": [11]}]}",
                b"{\"sha256\": [{\"pcrs\": [11], \"pol\": \"zz\", \"sig\": \"\"}]}", b"\xff\xfe"):
        with pytest.raises(pcr11.PcrSigError):
            pcr11.parse_pcrsig(bad)
