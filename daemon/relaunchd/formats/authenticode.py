"""Authenticode signatures of PE images (formats layer).

Parses the WIN_CERTIFICATE table of a PE image (a UKI, or the `.linux` kernel
inside one), computes the Authenticode image digest and verifies the PKCS#7
SignedData against caller-given trust anchors. The verdict is meant to agree
with `sbverify --cert CERT IMAGE` (sbsigntool 0.9.4), which the integration
tests use as the oracle.

Why our own code: signify does not import on Debian 12 (its oscrypto dependency
fails on OpenSSL 3.0.10+, uki.md §3.1), so asn1crypto parses and cryptography
verifies.

What a signature must pass (uki.md §3.1; Microsoft "Windows Authenticode
Portable Executable Signature Format"; RFC 2315 §9.3):

1. The image digest computed over `digest_ranges()` equals the digest in the
   SpcIndirectDataContent (the signed "content" of the PKCS#7).
2. The SignerInfo's messageDigest attribute equals the hash of that content's
   *value bytes*, i.e. the SpcIndirectDataContent SEQUENCE without its tag and
   length. Authenticode differs from plain PKCS#7 here; checked against sbsign
   output and Debian's signed vmlinuz (both hash the value bytes only).
3. The signature over the DER of the signed attributes, re-tagged from
   [0] IMPLICIT to SET OF (0x31) as RFC 2315 §9.3 requires, verifies with the
   signer certificate's key (RSA PKCS#1 v1.5 or ECDSA).
4. The signer certificate is one of the trusted certificates, or chains to one
   through certificates carried in the PKCS#7; every link's signature is
   checked.

Deliberately not checked, as in sbverify: certificate validity periods
(sbverify's verify callback accepts expired and not-yet-valid certificates,
"UEFI explicitly allows expired certificates"; tested), revocation, timestamps.
Also not checked: extended key usage. sbverify lets OpenSSL check the S/MIME
purpose and forgives the error only for a code-signing EKU, so it may reject
leaves with other EKUs [I, from its source, not tested].

Known differences from sbverify 0.9.4 on OpenSSL 3 [V, integration tests]:
- A PKCS#7 that carries an intermediate whose issuer is missing is accepted by
  sbverify whatever `--cert` says (its callback forgives "unable to get issuer
  certificate"). We require a trusted certificate on the path: no bypass.
- A PKCS#7 that carries the full chain up to an untrusted self-signed root is
  rejected by sbverify when only the leaf is trusted; we accept it (the leaf is
  trusted, as it is when the chain is not carried).
- sbverify stops at the first signature whose image digest mismatches; we look
  at every signature (sbsign gives all signatures of a file the same digest).

Everything here is a pure function of its inputs; the only I/O is reading the
given byte range of an already-open file (and certificates given as bytes;
`platform.trust_store` reads them from files).
"""

from __future__ import annotations

import hashlib
import re
import struct
from base64 import b64decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from relaunchd.errors import InvalidArgument, InvalidImage
from relaunchd.formats import hashing, pe, signature_report
from relaunchd.formats.signature_report import SignatureReport

# WIN_CERTIFICATE constants (PE/COFF spec, "The Attribute Certificate Table").
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
WIN_CERT_HEADER = 8

# OIDs (Authenticode PE format spec; RFC 2315).
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
OID_SPC_PE_IMAGE_DATA = "1.3.6.1.4.1.311.2.1.15"

# Limits that keep a hostile table from costing time or memory. Real tables are
# a few KiB per signature (sbsign: ~1.5 KiB; Debian's vmlinuz: 1.4 KiB).
MAX_CERT_TABLE = 16 << 20
MAX_SIGNATURES = 64
MAX_CHAIN_DEPTH = 16

# Digest algorithms we compute (hashlib names, as asn1crypto reports them).
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
SUPPORTED_DIGESTS = frozenset(_HASHES)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Signature:
    """One WIN_CERTIFICATE entry, parsed; enough to verify it later without re-parsing."""

    index: int                      # 0-based position in the certificate table
    digest_algorithm: str           # of the image digest, hashlib name ("sha256")
    expected_digest: bytes          # image digest from SpcIndirectDataContent
    signer_subject: str             # RFC 4514 string, or a description if the cert is missing
    signer_issuer: str
    certificates: tuple[bytes, ...] = field(repr=False)  # DER, all the PKCS#7 carries
    signer_certificate: int | None  # index into `certificates`
    signer_digest_algorithm: str    # SignerInfo digestAlgorithm (messageDigest, signature)
    signature_algorithm: str        # asn1crypto name, e.g. "rsassa_pkcs1v15", "sha256_ecdsa"
    signature: bytes = field(repr=False)
    content: bytes = field(repr=False)  # SpcIndirectDataContent value bytes (what is hashed)
    signed_attributes: bytes | None = field(repr=False)  # DER re-tagged as SET OF, or None
    message_digest: bytes | None = field(repr=False)
    content_type_ok: bool = True    # contentType attribute (if present) names SpcIndirectData


class SignatureSummary(NamedTuple):
    """Integrity-only view for reports without trust anchors."""

    signed: bool
    signers: list[str]
    digest_ok: list[bool]


# --------------------------------------------------------------------------- digest


# The ranges are pure PE layout, kept in `pe` so a caller can start hashing
# before this module (and cryptography/asn1crypto) is imported.
digest_ranges = pe.authenticode_ranges


def digest_sinks(headers: pe.PeHeaders, algorithms: Iterable[str]) -> dict[str, hashing.Sink]:
    """One hashing.Sink per supported algorithm, for a shared `hashing.feed` pass.

    Read the digest with `sinks[alg].hasher.digest()` after feeding."""
    wanted = sorted(set(algorithms) & SUPPORTED_DIGESTS)
    if not wanted:
        return {}
    ranges = digest_ranges(headers)
    return {alg: hashing.Sink(hashlib.new(alg), list(ranges)) for alg in wanted}


def compute_digests(fd: int, headers: pe.PeHeaders, algorithms: Iterable[str], *,
                    base: int = 0,
                    overlays: tuple[tuple[int, int, int], ...] = ()) -> dict[str, bytes]:
    """Authenticode digests of the image at `base` in `fd`, in one read pass
    (`overlays` as for hashing.feed)."""
    sinks = digest_sinks(headers, algorithms)
    try:
        hashing.feed(fd, list(sinks.values()), base=base, overlays=overlays)
    except OSError as exc:
        raise InvalidImage(f"read failed while hashing the image: {exc}") from None
    return {alg: sink.hasher.digest() for alg, sink in sinks.items()}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- parsing


class _SpcAttributeTypeAndOptionalValue(core.Sequence):
    _fields = [  # noqa: RUF012 (asn1crypto's declarative spec)
        ("type", core.ObjectIdentifier),
        ("value", core.Any, {"optional": True}),
    ]


class _SpcIndirectDataContent(core.Sequence):
    _fields = [  # noqa: RUF012
        ("data", _SpcAttributeTypeAndOptionalValue),
        ("message_digest", algos.DigestInfo),
    ]


def read_signatures(fd: int, headers: pe.PeHeaders, *, base: int = 0) -> list[Signature]:
    """Read and parse the certificate table of the image at `base` in `fd`."""
    if not headers.cert_table_size:
        return []
    if headers.cert_table_size > MAX_CERT_TABLE:
        raise InvalidImage(
            f"certificate table of {headers.cert_table_size} bytes is implausibly large")
    image = pe.FileRange(fd, base, headers.file_size)
    return parse_signatures(image.pread(headers.cert_table_offset, headers.cert_table_size))


def parse_signatures(cert_table: bytes) -> list[Signature]:
    """Walk the WIN_CERTIFICATE entries and parse each PKCS#7 SignedData.

    Entries are `dwLength u32, wRevision u16, wCertificateType u16, data`,
    each starting 8-byte aligned (PE/COFF spec; sbsign appends further
    signatures the same way). Anything malformed is an InvalidImage."""
    table = bytes(cert_table)
    if len(table) > MAX_CERT_TABLE:
        raise InvalidImage(f"certificate table of {len(table)} bytes is implausibly large")
    signatures: list[Signature] = []
    pos = 0
    while pos < len(table):
        where = f"certificate table entry {len(signatures)} (offset {pos})"
        if len(table) - pos < WIN_CERT_HEADER:
            raise InvalidImage(f"{where}: truncated WIN_CERTIFICATE header")
        length, revision, cert_type = struct.unpack_from("<IHH", table, pos)
        if length <= WIN_CERT_HEADER:
            raise InvalidImage(f"{where}: WIN_CERTIFICATE dwLength {length} is too small")
        if length > len(table) - pos:
            raise InvalidImage(
                f"{where}: WIN_CERTIFICATE dwLength {length} runs past the end of the "
                f"{len(table)}-byte table")
        if revision != WIN_CERT_REVISION_2_0:
            raise InvalidImage(
                f"{where}: WIN_CERTIFICATE revision 0x{revision:04x} (expected 0x0200)")
        if cert_type != WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            raise InvalidImage(
                f"{where}: certificate type 0x{cert_type:04x} is not PKCS#7 SignedData")
        if len(signatures) == MAX_SIGNATURES:
            raise InvalidImage(f"more than {MAX_SIGNATURES} signatures in the table")
        signatures.append(_parse_pkcs7(len(signatures), table[pos + WIN_CERT_HEADER:pos + length]))
        pos += (length + 7) & ~7
    return signatures


def _parse_pkcs7(index: int, data: bytes) -> Signature:
    try:
        return _parse_signed_data(index, data)
    except InvalidImage as exc:
        raise InvalidImage(f"signature {index + 1}: {exc}") from None
    except Exception as exc:
        # asn1crypto parses lazily and has no single error type (ValueError,
        # TypeError, KeyError, ... surface on first access), so any failure
        # while reading hostile bytes becomes a named error, never a traceback.
        detail = str(exc).replace("\n", " ")[:160]
        raise InvalidImage(
            f"signature {index + 1}: malformed PKCS#7 SignedData ({type(exc).__name__}: "
            f"{detail})") from None


def _parse_signed_data(index: int, data: bytes) -> Signature:
    # Some signers pad the DER inside dwLength; only zeros may follow it.
    _tag, _start, end = _tlv(data, 0)
    if data[end:].strip(b"\0"):
        raise InvalidImage("unexpected data after the PKCS#7 structure")
    info = cms.ContentInfo.load(data[:end], strict=True)
    if info["content_type"].dotted != OID_SIGNED_DATA:
        raise InvalidImage("PKCS#7 content is not SignedData")
    signed = info["content"]
    encap = signed["encap_content_info"]
    if encap["content_type"].dotted != OID_SPC_INDIRECT_DATA:
        raise InvalidImage("signed content is not SpcIndirectDataContent")
    content, content_der = _explicit_content(encap.contents)
    indirect = _SpcIndirectDataContent.load(content_der, strict=True)
    data_type = indirect["data"]["type"].dotted
    if data_type != OID_SPC_PE_IMAGE_DATA:
        raise InvalidImage(f"signs {data_type}, not a PE image (SpcPeImageData)")
    digest_info = indirect["message_digest"]
    digest_algorithm = str(digest_info["digest_algorithm"]["algorithm"].native)
    expected_digest = bytes(digest_info["digest"].native)

    certificates: list[asn1_x509.Certificate] = []
    bag = signed["certificates"]
    for choice in [] if isinstance(bag, core.Void) else bag:
        if choice.name == "certificate":
            cert = choice.chosen
            cert["tbs_certificate"]["subject"].native  # force the lazy parse now  # noqa: B018
            certificates.append(cert)

    # Authenticode allows exactly one SignerInfo per SignedData (PE spec).
    signer_infos = signed["signer_infos"]
    if len(signer_infos) != 1:
        raise InvalidImage(f"{len(signer_infos)} SignerInfos (Authenticode needs 1)")
    signer = signer_infos[0]
    signer_index = _find_signer(signer["sid"], certificates)
    sid = signer["sid"]
    if sid.name == "issuer_and_serial_number":
        issuer = rfc4514(sid.chosen["issuer"])
        serial = sid.chosen["serial_number"].native
        missing = f"unknown signer (issuer {issuer}, serial 0x{serial:x})"
    else:
        issuer = "unknown issuer"
        missing = f"unknown signer (key id {bytes(sid.chosen.native).hex()})"
    if signer_index is None:
        subject = missing
    else:
        subject = rfc4514(certificates[signer_index].subject)
        issuer = rfc4514(certificates[signer_index].issuer)

    signed_attributes = message_digest = None
    content_type_ok = True
    attrs = signer["signed_attrs"]
    if not isinstance(attrs, core.Void):   # optional field; Void when absent
        # Signature covers the attributes' DER with a SET OF tag (RFC 2315 §9.3);
        # use the original bytes, re-encoding could change their order.
        signed_attributes = b"\x31" + _der_length(len(attrs.contents)) + attrs.contents
        for attr in attrs:
            kind = attr["type"].native
            values = attr["values"]
            if kind == "message_digest":
                if len(values) != 1 or message_digest is not None:
                    raise InvalidImage("malformed messageDigest attribute")
                message_digest = bytes(values[0].native)
            elif kind == "content_type":
                content_type_ok = len(values) == 1 and values[0].dotted == OID_SPC_INDIRECT_DATA
            else:
                values.native  # force parsing of the remaining attributes  # noqa: B018
    return Signature(
        index=index,
        digest_algorithm=digest_algorithm,
        expected_digest=expected_digest,
        signer_subject=subject,
        signer_issuer=issuer,
        certificates=tuple(c.dump() for c in certificates),
        signer_certificate=signer_index,
        signer_digest_algorithm=str(signer["digest_algorithm"]["algorithm"].native),
        signature_algorithm=str(signer["signature_algorithm"]["algorithm"].native),
        signature=bytes(signer["signature"].native),
        content=content,
        signed_attributes=signed_attributes,
        message_digest=message_digest,
        content_type_ok=content_type_ok,
    )


def _find_signer(sid, certificates: Sequence[asn1_x509.Certificate]) -> int | None:
    for i, cert in enumerate(certificates):
        if sid.name == "issuer_and_serial_number":
            if (cert.serial_number == sid.chosen["serial_number"].native
                    and cert.issuer == sid.chosen["issuer"]):
                return i
        elif cert.key_identifier == sid.chosen.native:
            return i
    return None


def _explicit_content(encap_contents: bytes) -> tuple[bytes, bytes]:
    """From EncapsulatedContentInfo's value (OID, [0] EXPLICIT content), return
    the content SEQUENCE's value bytes (what messageDigest covers) and its DER."""
    tag, _, oid_end = _tlv(encap_contents, 0)
    if tag != 0x06:
        raise InvalidImage("PKCS#7 content type is not an OID")
    tag, inner_start, explicit_end = _tlv(encap_contents, oid_end)
    if tag != 0xA0 or explicit_end != len(encap_contents):
        raise InvalidImage("PKCS#7 signed content is missing or malformed")
    tag, value_start, value_end = _tlv(encap_contents, inner_start)
    if tag != 0x30 or value_end != explicit_end:
        raise InvalidImage("SpcIndirectDataContent is not a single SEQUENCE")
    return encap_contents[value_start:value_end], encap_contents[inner_start:value_end]


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag byte, value start, value end) of the DER element at `pos`; low-tag-number
    form and definite lengths only, as DER requires."""
    if pos + 2 > len(buf):
        raise InvalidImage("malformed PKCS#7 DER: truncated element")
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise InvalidImage("malformed PKCS#7 DER: high-tag-number element")
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80 or first > 0x84:
        raise InvalidImage("malformed PKCS#7 DER: indefinite or oversized length")
    else:
        count = first & 0x7F
        if pos + count > len(buf):
            raise InvalidImage("malformed PKCS#7 DER: truncated length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > len(buf):
        raise InvalidImage("malformed PKCS#7 DER: element runs past its container")
    return tag, pos, pos + length


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


# Short attribute names for RFC 4514 strings (RFC 4514 §3 plus common ones).
_SHORT_NAMES = {
    "common_name": "CN", "organization_name": "O", "organizational_unit_name": "OU",
    "country_name": "C", "state_or_province_name": "ST", "locality_name": "L",
    "street_address": "STREET", "domain_component": "DC", "user_id": "UID",
    "email_address": "E", "serial_number": "serialNumber",
}


def rfc4514(name: asn1_x509.Name) -> str:
    """RFC 4514 string of a Name: last RDN first, "CN=relaunchd test db"."""
    parts = []
    for rdn in reversed(list(name.chosen)):
        avas = []
        for ava in rdn:
            kind = ava["type"].native
            key = _SHORT_NAMES.get(kind, ava["type"].dotted)
            value = ava["value"].native
            avas.append(f"{key}={_escape(value if isinstance(value, str) else str(value))}")
        parts.append("+".join(avas))
    return ",".join(parts)


def _escape(value: str) -> str:
    escaped = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and len(escaped) > 1:
        escaped = escaped[:-1] + "\\ "
    return escaped


# --------------------------------------------------------------------------- trust


_PEM_CERT = re.compile(
    rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.*?)-----END (?:X509 |TRUSTED )?"
    rb"CERTIFICATE-----", re.S)


def certificates_from(path: str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN" in data:
        blocks = _PEM_CERT.findall(data)
        if not blocks:
            raise InvalidArgument(f"{path}: PEM file contains no CERTIFICATE block")
        ders = []
        for block in blocks:
            try:
                ders.append(b64decode(b"".join(block.split()), validate=True))
            except ValueError:
                raise InvalidArgument(f"{path}: PEM certificate is not valid base64") from None
    else:
        ders = [data]
    certs = []
    for der in ders:
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except Exception as exc:  # cryptography raises several types for bad DER
            raise InvalidArgument(f"{path}: not an X.509 certificate ({exc})") from None
    return certs


# --------------------------------------------------------------------------- verification


def verify(signatures: Sequence[Signature], digests: dict[str, bytes],
           trusted: Sequence[x509.Certificate]) -> SignatureReport:
    """Verify every signature; the image verifies if any one does (as sbverify,
    which loops over all signatures of the table)."""
    if not signatures:
        return signature_report.unsigned()
    anchors = list(trusted)
    digest_ok: list[bool] = []
    reasons: list[str] = []
    verified_by: str | None = None
    for sig in signatures:
        label = f"signature {sig.index + 1}"
        computed = digests.get(sig.digest_algorithm)
        ok = computed is not None and computed == sig.expected_digest
        digest_ok.append(ok)
        if computed is None:
            reasons.append(f"{label}: digest algorithm {sig.digest_algorithm} not supported")
            continue
        if not ok:
            reasons.append(f"{label}: image digest does not match (tampered?)")
            continue
        try:
            problem = _check_signed_data(sig)
            if problem is None and not _chains_to(sig, anchors):
                why = "no trusted certificates given" if not anchors else "not trusted"
                problem = f"signed by {sig.signer_subject}, {why}"
        except Exception as exc:
            # cryptography parses certificate fields lazily too, and hostile
            # certificates surface as KeyError, ValueError, ... on first use
            # (found by fuzzing): such a signature simply does not verify.
            problem = f"certificate unusable ({type(exc).__name__})"
        if problem:
            reasons.append(f"{label}: {problem}")
            continue
        verified_by = verified_by or sig.signer_subject
    return SignatureReport(
        signed=True,
        signers=[s.signer_subject for s in signatures],
        digest_ok=digest_ok,
        verified=verified_by is not None,
        verified_by=verified_by,
        reasons=reasons,   # kept when another signature verified: they are still facts
    )


def verify_file(fd: int, headers: pe.PeHeaders, trusted: Sequence[x509.Certificate], *,
                base: int = 0) -> SignatureReport:
    """Read the certificate table, hash the image once, verify (see `verify`)."""
    signatures = read_signatures(fd, headers, base=base)
    digests = compute_digests(fd, headers, {s.digest_algorithm for s in signatures}, base=base)
    return verify(signatures, digests, trusted)


def inspect_signatures(fd: int, headers: pe.PeHeaders, *, base: int = 0) -> SignatureSummary:
    """Signers and digest integrity, without any trust decision."""
    report = verify_file(fd, headers, [], base=base)
    return SignatureSummary(report.signed, report.signers, report.digest_ok)


def _check_signed_data(sig: Signature) -> str | None:
    """Steps 2 and 3 of the module docstring; None if the PKCS#7 itself is sound."""
    if sig.signer_certificate is None:
        return f"signer certificate of {sig.signer_subject} is not included"
    algorithm = _HASHES.get(sig.signer_digest_algorithm)
    if algorithm is None:
        return f"signer digest algorithm {sig.signer_digest_algorithm} not supported"
    if sig.signed_attributes is None:
        signed_bytes = sig.content  # no attributes: RFC 2315 signs the content itself
    else:
        if not sig.content_type_ok:
            return "contentType attribute does not name SpcIndirectDataContent"
        if sig.message_digest is None:
            return "signed attributes lack a messageDigest"
        actual = hashlib.new(sig.signer_digest_algorithm, sig.content).digest()
        if actual != sig.message_digest:
            return "messageDigest does not match the signed content"
        signed_bytes = sig.signed_attributes
    try:
        cert = x509.load_der_x509_certificate(sig.certificates[sig.signer_certificate])
        key = cert.public_key()
    except Exception as exc:  # same: untrusted bytes, several error types
        return f"signer certificate unusable ({exc})"
    if sig.signature_algorithm not in _SIGNATURE_ALGORITHMS.get(_key_family(key), ()):
        # The field is not covered by the signature, so it must at least name
        # the family of the signer's key (found by fuzzing: a mangled OID here
        # was otherwise ignored). RSA-PSS is not supported.
        return f"signature algorithm {sig.signature_algorithm} not supported for this key"
    if not _verify_with(key, sig.signature, signed_bytes, algorithm()):
        return "signature does not verify"
    return None


# SignerInfo signatureAlgorithm names (asn1crypto) accepted per key family; the
# hash comes from the SignerInfo digestAlgorithm, as in OpenSSL's PKCS7_verify.
_SIGNATURE_ALGORITHMS = {
    "rsa": frozenset({"rsassa_pkcs1v15", "sha1_rsa", "sha224_rsa", "sha256_rsa",
                      "sha384_rsa", "sha512_rsa"}),
    "ec": frozenset({"ecdsa", "sha1_ecdsa", "sha224_ecdsa", "sha256_ecdsa",
                     "sha384_ecdsa", "sha512_ecdsa"}),
    "ed25519": frozenset({"ed25519"}),
    "ed448": frozenset({"ed448"}),
}


def _key_family(key) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    return None


def _verify_with(key, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _chains_to(sig: Signature, anchors: Sequence[x509.Certificate]) -> bool:
    """Step 4: walk issuer links from the signer through the PKCS#7's certificates
    until a trusted certificate is reached (equal to, or the verified issuer of,
    the current one). Like sbverify's verify callback, any trusted certificate
    ends the walk, self-signed or not."""
    if not anchors or sig.signer_certificate is None:
        return False
    try:
        pool = [x509.load_der_x509_certificate(der) for der in sig.certificates]
    except Exception:  # same: untrusted bytes, several error types
        return False
    trusted_der = {a.public_bytes(Encoding.DER) for a in anchors}
    current = pool[sig.signer_certificate]
    seen: set[bytes] = set()
    for _ in range(MAX_CHAIN_DEPTH):
        der = current.public_bytes(Encoding.DER)
        if der in trusted_der:
            return True
        if any(_issued_by(current, a) for a in anchors):
            return True
        seen.add(der)
        parent = next((c for c in pool if c.public_bytes(Encoding.DER) not in seen
                       and _issued_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        if child.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS:
            return False  # cryptography 38 exposes no PSS parameters to check with
        algorithm = child.signature_hash_algorithm
        key = issuer.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return False
    if algorithm is None and not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return False
    return _verify_with(key, child.signature, child.tbs_certificate_bytes, algorithm)


__all__ = [
    "Signature",
    "SignatureReport",
    "SignatureSummary",
    "certificates_from",
    "compute_digests",
    "digest_ranges",
    "digest_sinks",
    "inspect_signatures",
    "parse_signatures",
    "read_signatures",
    "verify",
    "verify_file",
]
