"""PCR 11 prediction as systemd-stub measures a UKI, and `.pcrsig` checks (formats layer).

Facts: docs/research/uki.md §2.1 (two extends per section, enum order, empty
sections skipped, `.pcrsig` never measured), §1.2 (which sections a stub
version knows), §2.2 (phase words, extended without NUL) and §2.4 (`.pcrsig`
JSON, PolicyPCR digest, signature).

The section digests themselves are computed by the caller in one pass over the
file (see `hashing`); this module turns them into PCR values.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, field

BANKS = ("sha1", "sha256", "sha384", "sha512")
# TPM2 algorithm ids used in TPML_PCR_SELECTION (TCG Algorithm Registry).
TPM2_ALG = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
TPM2_CC_POLICY_PCR = 0x0000017F
PCR_KERNEL_IMAGE = 11

# systemd's `enum UnifiedSection` order (src/fundamental/uki.h) — the
# measurement order, not the file order.
SECTION_ORDER = (
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname",
    ".sbat", ".pcrsig", ".pcrpkey", ".profile", ".dtbauto", ".hwids", ".efifw",
)
# The stub version that first measured each section (uki.md §1.2). 252 is
# verified against Debian's stub and systemd-measure; later entries follow the
# table's "added" column.
SECTION_SINCE = {
    ".linux": 0, ".osrel": 0, ".cmdline": 0, ".initrd": 0, ".splash": 0, ".dtb": 0,
    ".pcrpkey": 252, ".uname": 253, ".sbat": 253, ".ucode": 256,
    ".profile": 257, ".dtbauto": 257, ".hwids": 257, ".efifw": 258,
}
# Measured only if the firmware's hardware matches one candidate: not predictable.
HARDWARE_DEPENDENT = frozenset({".dtbauto", ".efifw"})
DEFAULT_PHASES = (
    "enter-initrd",
    "enter-initrd:leave-initrd",
    "enter-initrd:leave-initrd:sysinit",
    "enter-initrd:leave-initrd:sysinit:ready",
)


def measured_names(stub_major: int | None) -> tuple[str, ...]:
    """Sections a stub of this major version measures, in measurement order.
    Unknown stub (no `.sdmagic`) → assume the newest stub."""
    return tuple(
        name for name in SECTION_ORDER
        if name != ".pcrsig" and (stub_major is None or SECTION_SINCE[name] <= stub_major)
    )


def extended(bank: str, pcr: bytes, digest: bytes) -> bytes:
    return hashlib.new(bank, pcr + digest).digest()


@dataclass(frozen=True)
class MeasuredSection:
    name: str
    size: int                      # VirtualSize: the bytes measured
    digests: dict[str, bytes]      # bank -> digest of the measured image


@dataclass
class Pcr11Prediction:
    banks: tuple[str, ...]
    sections: list[MeasuredSection]
    after_sections: dict[str, bytes]
    phases: dict[str, dict[str, bytes]]          # phase path -> bank -> value
    not_measured: list[tuple[str, str]] = field(default_factory=list)  # (section, why)


def predict(sections: list[MeasuredSection], banks: tuple[str, ...],
            phases: tuple[str, ...] = DEFAULT_PHASES) -> Pcr11Prediction:
    """PCR 11 from an all-zero start: per section H(name+NUL), then H(image);
    then each phase path's words."""
    values = {bank: bytes(hashlib.new(bank).digest_size) for bank in banks}
    for section in sections:
        for bank in banks:
            name_digest = hashlib.new(bank, section.name.encode() + b"\0").digest()
            values[bank] = extended(bank, values[bank], name_digest)
            values[bank] = extended(bank, values[bank], section.digests[bank])
    phase_values: dict[str, dict[str, bytes]] = {}
    for path in phases:
        current = dict(values)
        for word in filter(None, path.split(":")):
            for bank in banks:
                word_digest = hashlib.new(bank, word.encode()).digest()
                current[bank] = extended(bank, current[bank], word_digest)
        phase_values[path] = current
    return Pcr11Prediction(banks=banks, sections=sections, after_sections=values,
                           phases=phase_values)


def order_for_measurement(present: dict[str, int], stub_major: int | None
                          ) -> tuple[list[str], list[tuple[str, str]]]:
    """Which present sections (name -> VirtualSize) the stub extends, in order,
    and why the others are left out."""
    known = measured_names(stub_major)
    measured: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in SECTION_ORDER:
        if name not in present:
            continue
        if name == ".pcrsig":
            skipped.append((name, "never measured"))
        elif name in HARDWARE_DEPENDENT:
            skipped.append((name, "measured only when it matches the hardware"))
        elif name not in known:
            skipped.append((name, f"not measured by systemd-stub {stub_major}"))
        elif present[name] == 0:
            skipped.append((name, "empty"))
        else:
            measured.append(name)
    return measured, skipped


# ------------------------------------------------------------------ .pcrsig (uki.md §2.4)


class PcrSigError(ValueError):
    """`.pcrsig` content that is not the documented JSON shape."""


@dataclass(frozen=True)
class PcrSigEntry:
    bank: str
    pcrs: tuple[int, ...]
    pkfp: str | None
    policy: bytes
    signature: bytes


def parse_pcrsig(data: bytes) -> list[PcrSigEntry]:
    text = data.split(b"\0", 1)[0]
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PcrSigError(f".pcrsig is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PcrSigError(".pcrsig is not a JSON object")
    entries: list[PcrSigEntry] = []
    for bank, items in doc.items():
        if not isinstance(items, list):
            raise PcrSigError(f".pcrsig bank {bank!r} is not a list")
        for item in items:
            try:
                entries.append(PcrSigEntry(
                    bank=str(bank).lower(),
                    pcrs=tuple(int(p) for p in item["pcrs"]),
                    pkfp=item.get("pkfp"),
                    policy=bytes.fromhex(item["pol"]),
                    signature=base64.b64decode(item["sig"], validate=True),
                ))
            except (KeyError, TypeError, ValueError) as exc:
                raise PcrSigError(f".pcrsig entry in bank {bank!r} is malformed: {exc}") from None
    return entries


def policy_pcr_digest(bank: str, pcr_value: bytes, pcr: int = PCR_KERNEL_IMAGE) -> bytes:
    """TPM2 PolicyPCR digest for one PCR in one bank, from an empty policy."""
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    selection = struct.pack(">IHB", 1, TPM2_ALG[bank], 3) + bytes(select)
    pcr_digest = hashlib.sha256(pcr_value).digest()
    return hashlib.sha256(
        bytes(32) + struct.pack(">I", TPM2_CC_POLICY_PCR) + selection + pcr_digest
    ).digest()


@dataclass(frozen=True)
class PcrSigCheck:
    bank: str
    phase: str
    matches: bool              # a signed policy equals the one for our predicted value
    signature_valid: bool | None  # None: no entry matched, or no `.pcrpkey` to check with


def check_pcrsig(entries: list[PcrSigEntry], prediction: Pcr11Prediction,
                 public_key_pem: bytes | None) -> list[PcrSigCheck]:
    """For every bank and phase we predicted: is there a signed policy for it,
    and does its signature verify with `.pcrpkey`?"""
    key = _load_public_key(public_key_pem) if public_key_pem else None
    results = []
    for bank in prediction.banks:
        candidates = [e for e in entries if e.bank == bank and e.pcrs == (PCR_KERNEL_IMAGE,)]
        for phase, values in prediction.phases.items():
            wanted = policy_pcr_digest(bank, values[bank])
            entry = next((e for e in candidates if e.policy == wanted), None)
            valid = None
            if entry is not None and key is not None:
                valid = _signature_valid(key, entry)
            results.append(PcrSigCheck(bank=bank, phase=phase, matches=entry is not None,
                                       signature_valid=valid))
    return results


def _load_public_key(pem: bytes):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(pem.split(b"\0", 1)[0])
    except (ValueError, TypeError):
        return None


def _signature_valid(key, entry: PcrSigEntry) -> bool:
    """systemd signs the 32-byte policy; current versions with SHA-256 for every
    bank, ≤259 with the bank's own hash (uki.md §2.4): accept either."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    algorithms = [hashes.SHA256()]
    bank_hash = {"sha1": hashes.SHA1(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
    if entry.bank in bank_hash:
        algorithms.append(bank_hash[entry.bank])
    for algorithm in algorithms:
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(entry.signature, entry.policy, padding.PKCS1v15(), algorithm)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(entry.signature, entry.policy, ec.ECDSA(algorithm))
            else:
                return False
            return True
        except InvalidSignature:
            continue
    return False
