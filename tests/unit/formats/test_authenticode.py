"""Authenticode parsing and verification logic, without the sbverify oracle.

Malformed certificate tables must give a named InvalidImage, never a
traceback. The starting point for every mutation is a real table: a small UKI
(Debian's stub plus a tiny payload) signed twice by sbsign."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import struct

import pytest
from asn1crypto import cms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidImage
from relaunchd.formats import authenticode, pe
from relaunchd.platform import trust_store
from support import ukibuild

SPC_INDIRECT_DATA_OID = bytes.fromhex("060a2b0601040182370201 04".replace(" ", ""))
SPC_PE_IMAGE_DATA_OID = bytes.fromhex("060a2b060104018237020 10f".replace(" ", ""))


@dataclasses.dataclass(frozen=True)
class Signed:
    image: bytes
    headers: pe.PeHeaders
    table: bytes
    digest: bytes          # sha256 Authenticode digest, computed from digest_ranges


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys) -> Signed:
    d = tmp_path_factory.mktemp("signed-small")
    image = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b"ID=test\n"), (".cmdline", b"quiet"), (".linux", b"MZ" + bytes(5000)),
    ]), d / "small.efi")
    once = ukibuild.sign(image, keys["other"], d / "once.efi")
    twice = ukibuild.sign(once, keys["db"], d / "twice.efi")
    data = twice.read_bytes()
    fd = os.open(twice, os.O_RDONLY)
    try:
        headers = pe.parse_headers(pe.FileRange(fd, 0, len(data)))
    finally:
        os.close(fd)
    digest = hashlib.sha256()
    for offset, length in authenticode.digest_ranges(headers):
        digest.update(data[offset:offset + length])
    table = data[headers.cert_table_offset:headers.cert_table_offset + headers.cert_table_size]
    return Signed(data, headers, table, digest.digest())


@pytest.fixture(scope="module")
def trusted(keys) -> list:
    return trust_store.load_certificates([str(keys["db"].cert)])


def entries(table: bytes) -> list[tuple[int, int]]:
    """(offset, dwLength) of each WIN_CERTIFICATE entry."""
    out, pos = [], 0
    while pos < len(table):
        length = struct.unpack_from("<I", table, pos)[0]
        out.append((pos, length))
        pos += (length + 7) & ~7
    return out


def rejected(table: bytes, fragment: str) -> str:
    with pytest.raises(InvalidImage) as info:
        authenticode.parse_signatures(table)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- parsing


def test_real_table_parses(signed, keys):
    sigs = authenticode.parse_signatures(signed.table)
    assert [s.index for s in sigs] == [0, 1]
    assert [s.signer_subject for s in sigs] == [keys["other"].subject, keys["db"].subject]
    assert [s.signer_issuer for s in sigs] == [keys["other"].subject, keys["db"].subject]
    for sig in sigs:
        assert sig.digest_algorithm == "sha256"
        # digest_ranges + hashlib alone reproduce what sbsign signed.
        assert sig.expected_digest == signed.digest
        assert sig.signer_certificate == 0 and len(sig.certificates) == 1
        assert sig.signed_attributes is not None and sig.signed_attributes[0] == 0x31
        assert sig.message_digest == hashlib.sha256(sig.content).digest()
    # Entries are 8-byte aligned, dwLength counts the 8-byte header.
    offsets = entries(signed.table)
    assert len(offsets) == 2 and offsets[1][0] % 8 == 0


def test_empty_table_has_no_signatures():
    assert authenticode.parse_signatures(b"") == []


def with_header(table: bytes, entry: int = 0, *, length: int | None = None,
                revision: int | None = None, kind: int | None = None) -> bytes:
    data = bytearray(table)
    pos = entries(table)[entry][0]
    old = struct.unpack_from("<IHH", data, pos)
    struct.pack_into("<IHH", data, pos, old[0] if length is None else length,
                     old[1] if revision is None else revision, old[2] if kind is None else kind)
    return bytes(data)


def test_truncated_header(signed):
    rejected(signed.table[:5], "truncated WIN_CERTIFICATE header")


@pytest.mark.parametrize("keep", [9, 100, 1000])
def test_truncated_entry(signed, keep):
    rejected(signed.table[:keep], "runs past the end")


def test_truncated_second_entry(signed):
    second = entries(signed.table)[1][0]
    rejected(signed.table[:second + 200], "entry 1")


def test_wrong_revision(signed):
    rejected(with_header(signed.table, revision=0x0100), "revision 0x0100")
    rejected(with_header(signed.table, entry=1, revision=0x0201), "revision 0x0201")


def test_not_pkcs7(signed):
    rejected(with_header(signed.table, kind=0x0001), "not PKCS#7 SignedData")


@pytest.mark.parametrize("length", [0, 1, 8])
def test_dwlength_too_small(signed, length):
    rejected(with_header(signed.table, length=length), f"dwLength {length} is too small")


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFF8, None])
def test_dwlength_huge(signed, length):
    length = len(signed.table) + 1 if length is None else length
    rejected(with_header(signed.table, length=length), "runs past the end")


def pkcs7_entry(der: bytes) -> bytes:
    entry = struct.pack("<IHH", 8 + len(der), 0x0200, 0x0002) + der
    return entry + bytes(-len(entry) % 8)


@pytest.mark.parametrize(("payload", "fragment"), [
    (b"\x00" * 64, "malformed PKCS#7"),
    (random.Random(7).randbytes(200), "signature 1: "),
    (b"\x30\x82\x01\x00" + bytes(16), "runs past its container"),
    (b"\x30\x80" + bytes(30), "indefinite"),
    (b"\x30\x03\x02\x01\x00", "malformed PKCS#7 SignedData"),
    (cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump(),
     "not SignedData"),
])
def test_garbage_pkcs7(payload, fragment):
    rejected(pkcs7_entry(payload), fragment)


def first_der(table: bytes) -> bytes:
    _, length = entries(table)[0]
    return table[8:length]


def test_other_signed_content_type(signed):
    der = first_der(signed.table)
    wrong = SPC_INDIRECT_DATA_OID[:-1] + b"\x05"
    rejected(pkcs7_entry(der.replace(SPC_INDIRECT_DATA_OID, wrong, 1)),
             "not SpcIndirectDataContent")


def test_not_a_pe_image_signature(signed):
    der = first_der(signed.table)
    assert SPC_PE_IMAGE_DATA_OID in der
    wrong = SPC_PE_IMAGE_DATA_OID[:-1] + b"\x1e"
    rejected(pkcs7_entry(der.replace(SPC_PE_IMAGE_DATA_OID, wrong, 1)), "not a PE image")


def test_padding_inside_dwlength(signed):
    """Zeros after the DER but inside dwLength are padding; anything else is not."""
    der = first_der(signed.table)
    [sig] = authenticode.parse_signatures(pkcs7_entry(der + bytes(5)))
    assert sig.expected_digest == signed.digest
    rejected(pkcs7_entry(der + b"\x01"), "unexpected data after the PKCS#7")


def test_table_size_cap():
    rejected(bytes(authenticode.MAX_CERT_TABLE + 1), "implausibly large")


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
)


def mutate(table: bytes, steps) -> bytes:
    data = bytearray(table)
    for kind, where, value in steps:
        if not data:
            break
        pos = where % len(data)
        if kind == "set":
            data[pos] = value
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = bytes([value])
        else:
            del data[pos:pos + value]
    return bytes(data)


# Mutated certificates can carry e.g. negative serials; cryptography warns, fine here.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_tables_only_raise_invalid_image(signed, trusted, steps):
    table = mutate(signed.table, steps)
    try:
        sigs = authenticode.parse_signatures(table)
    except InvalidImage as exc:
        assert str(exc)
        return
    # Whatever parsed must also verify without raising.
    report = authenticode.verify(sigs, {"sha256": signed.digest}, trusted)
    assert report.signed is bool(sigs)
    assert len(report.digest_ok) == len(sigs)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=600))
def test_random_pkcs7_bodies(data):
    with contextlib.suppress(InvalidImage):
        authenticode.parse_signatures(pkcs7_entry(data))


# --------------------------------------------------------------------------- verify()


def test_verify_outcomes(signed, trusted, keys):
    sigs = authenticode.parse_signatures(signed.table)
    good = authenticode.verify(sigs, {"sha256": signed.digest}, trusted)
    assert good.verified and good.verified_by == keys["db"].subject
    assert good.digest_ok == [True, True]
    assert good.reasons == [f"signature 1: signed by {keys['other'].subject}, not trusted"]

    bad = authenticode.verify(sigs, {"sha256": bytes(32)}, trusted)
    assert not bad.verified and bad.digest_ok == [False, False]
    assert bad.reasons == [f"signature {i}: image digest does not match (tampered?)"
                           for i in (1, 2)]

    missing = authenticode.verify(sigs, {}, trusted)
    assert missing.digest_ok == [False, False]
    assert "digest algorithm sha256 not supported" in missing.reasons[0]

    untrusted = authenticode.verify(sigs, {"sha256": signed.digest}, [])
    assert not untrusted.verified and untrusted.signers == [keys["other"].subject,
                                                           keys["db"].subject]
    assert all(r.endswith("no trusted certificates given") for r in untrusted.reasons)

    nothing = authenticode.verify([], {}, trusted)
    assert not nothing.signed and not nothing.verified


@pytest.mark.parametrize(("change", "reason"), [
    ({"signer_certificate": None}, "is not included"),
    ({"content_type_ok": False}, "contentType attribute"),
    ({"message_digest": None}, "lack a messageDigest"),
    ({"message_digest": bytes(32)}, "messageDigest does not match"),
    ({"content": b"\x00"}, "messageDigest does not match"),
    ({"signed_attributes": None}, "signature does not verify"),  # then the content is signed
    ({"signature": bytes(256)}, "signature does not verify"),
    ({"signer_digest_algorithm": "md5"}, "md5 not supported"),
    ({"signature_algorithm": "rsassa_pss"}, "rsassa_pss not supported"),
    ({"signature_algorithm": "sha256_ecdsa"}, "not supported for this key"),
    ({"signature_algorithm": "1.2.840.113549.1.117.1"}, "not supported for this key"),
])
def test_verify_rejects_each_broken_step(signed, trusted, change, reason):
    sig = authenticode.parse_signatures(signed.table)[1]
    assert authenticode.verify([sig], {"sha256": signed.digest}, trusted).verified
    broken = dataclasses.replace(sig, **change)
    report = authenticode.verify([broken], {"sha256": signed.digest}, trusted)
    assert not report.verified
    assert len(report.reasons) == 1 and reason in report.reasons[0], report.reasons


def test_rfc4514_escaping(signed):
    from asn1crypto import x509 as asn1_x509

    name = asn1_x509.Name.build({"common_name": "a,b+c", "organization_name": " lead"})
    assert authenticode.rfc4514(name) in ("O=\\ lead,CN=a\\,b\\+c", "CN=a\\,b\\+c,O=\\ lead")
