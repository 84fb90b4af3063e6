"""TPM 2.0 policy digests, computed as the TPM computes them (formats layer).

A LUKS2 volume sealed to the TPM stores the digest of the policy its key object
was created with; the TPM releases the key only in a policy session whose digest
ends equal. Predicting whether a volume unlocks after a relaunch is computing that
digest over the PCR values the new boot will have. Sources, TPM 2.0 Library
Part 3 (Commands), rev. 1.59:

- §23.2.3 PolicyUpdate(): digest := H(digest || commandCode || arg2.name);
  digest := H(digest || arg3.buffer).
- §23.7 TPM2_PolicyPCR: digest := H(digest || TPM_CC_PolicyPCR || pcrs || digestTPM),
  `pcrs` the TPML_PCR_SELECTION as marshalled in the command, `digestTPM` the
  session's hash of the selected PCR values concatenated in selection order
  (selections in list order, PCRs ascending within one).
- §23.16 TPM2_PolicyAuthorize: the digest is reset to zeros, then
  PolicyUpdate(TPM_CC_PolicyAuthorize, keySign name, policyRef).
- §23.17 TPM2_PolicyAuthValue: digest := H(digest || TPM_CC_PolicyAuthValue).

Part 2 (Structures) §10.6.2 TPMS_PCR_SELECTION {hash u16, sizeofSelect u8,
pcrSelect[sizeofSelect]}, §10.9.7 TPML_PCR_SELECTION {count u32, selections};
big-endian. sizeofSelect is 3 (24 PCRs) in systemd (tpm2_pcr_mask_to_selection)
and tpm2-tools; it is part of the digest, so it is fixed here too.
§12.2.4 TPMT_PUBLIC, §16 Name = nameAlg || H_nameAlg(TPMT_PUBLIC).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument
from relaunchd.formats import pcr11

# TCG Algorithm Registry ids.
HASH_ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
HASH_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
TPM_ALG_RSA = 0x0001
TPM_ALG_NULL = 0x0010
# Part 2 §6.5.2 TPM_CC.
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_PCR = 0x0000017F
# Part 2 §8.3 TPMA_OBJECT bits used by systemd's PCR-signing public key.
TPMA_OBJECT_USERWITHAUTH = 0x00000040
TPMA_OBJECT_DECRYPT = 0x00020000
TPMA_OBJECT_SIGN_ENCRYPT = 0x00040000
PCR_COUNT = 24
SIZEOF_SELECT = 3


def hash_name(name: str) -> str:
    bank = name.lower()
    if bank not in HASH_ALG_IDS:
        raise InvalidArgument(f"unknown TPM hash algorithm {name!r} "
                              f"(known: {', '.join(HASH_ALG_IDS)})")
    return bank


def digest(alg: str, data: bytes) -> bytes:
    return hashlib.new(hash_name(alg), data).digest()


def extended(bank: str, value: bytes, measured: bytes) -> bytes:
    """TPM2_PCR_Extend of one bank (Part 1 §17.2, pcr11.extended) on values read from a
    TPM or a token, whose sizes are checked first."""
    if len(value) != HASH_SIZES[hash_name(bank)] or len(measured) != len(value):
        raise InvalidArgument(f"{bank} PCR values and digests are {HASH_SIZES[bank]} bytes")
    return pcr11.extended(hash_name(bank), value, measured)


@dataclass(frozen=True)
class PcrSelection:
    """One bank's PCRs in a TPML_PCR_SELECTION."""

    bank: str
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        hash_name(self.bank)
        for pcr in self.pcrs:
            if not 0 <= pcr < PCR_COUNT:
                raise InvalidArgument(f"PCR {pcr} out of range 0-{PCR_COUNT - 1}")
        if len(set(self.pcrs)) != len(self.pcrs):
            raise InvalidArgument(f"PCR listed twice in {self.pcrs}")

    def marshal(self) -> bytes:
        select = bytearray(SIZEOF_SELECT)
        for pcr in self.pcrs:
            select[pcr // 8] |= 1 << (pcr % 8)
        return struct.pack(">HB", HASH_ALG_IDS[self.bank.lower()], SIZEOF_SELECT) + bytes(select)

    @property
    def ordered(self) -> tuple[int, ...]:
        # The TPM walks the bitmap: PCRs ascending whatever order they were listed in.
        return tuple(sorted(self.pcrs))


def marshal_selection(selections: Sequence[PcrSelection]) -> bytes:
    return struct.pack(">I", len(selections)) + b"".join(s.marshal() for s in selections)


def empty_policy(session_alg: str = "sha256") -> bytes:
    """A policy session's digest at its start: all zeros (Part 1 §19.7.1)."""
    return bytes(HASH_SIZES[hash_name(session_alg)])


def pcr_values_digest(selections: Sequence[PcrSelection],
                      values: Mapping[str, Mapping[int, bytes]],
                      session_alg: str = "sha256") -> bytes:
    """digestTPM of PolicyPCR: the session hash over the selected values, in order.
    `values`: bank -> PCR -> value; each value must be the bank's digest size."""
    parts = []
    for selection in selections:
        bank = selection.bank.lower()
        for pcr in selection.ordered:
            value = values.get(bank, {}).get(pcr)
            if value is None:
                raise InvalidArgument(f"no {bank} value for PCR {pcr}")
            if len(value) != HASH_SIZES[bank]:
                raise InvalidArgument(f"{bank} PCR {pcr} value is {len(value)} bytes, "
                                      f"not {HASH_SIZES[bank]}")
            parts.append(value)
    return digest(session_alg, b"".join(parts))


def policy_pcr(previous: bytes, selections: Sequence[PcrSelection],
               values: Mapping[str, Mapping[int, bytes]], session_alg: str = "sha256") -> bytes:
    """TPM2_PolicyPCR applied to `previous` (Part 3 §23.7)."""
    _check_previous(previous, session_alg)
    pcr_digest = pcr_values_digest(selections, values, session_alg)
    return digest(session_alg, previous + struct.pack(">I", TPM_CC_POLICY_PCR)
                  + marshal_selection(selections) + pcr_digest)


def policy_auth_value(previous: bytes, session_alg: str = "sha256") -> bytes:
    """TPM2_PolicyAuthValue applied to `previous` (Part 3 §23.17)."""
    _check_previous(previous, session_alg)
    return digest(session_alg, previous + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE))


def policy_authorize(key_name: bytes, policy_ref: bytes = b"",
                     session_alg: str = "sha256") -> bytes:
    """TPM2_PolicyAuthorize with a valid ticket: the digest restarts from zeros
    (Part 3 §23.16), whatever came before — which is why it must come first."""
    start = empty_policy(session_alg)
    first = digest(session_alg, start + struct.pack(">I", TPM_CC_POLICY_AUTHORIZE) + key_name)
    return digest(session_alg, first + policy_ref)


def rsa_signing_key_name(modulus: bytes, exponent: int) -> bytes:
    """The TPM Name of an RSA public key loaded the way systemd 252 loads the PCR
    signing key (src/shared/tpm2-util.c, openssl_pubkey_to_tpm2_pubkey): nameAlg
    SHA-256, DECRYPT|SIGN_ENCRYPT|USERWITHAUTH, no symmetric, no scheme, empty
    authPolicy. systemd copies the exponent's big-endian bytes (BN_bn2bin) into the
    first bytes of a u32 read in host (little-endian) order; for 65537, the exponent
    in practice, that is 65537 again, and it is reproduced as such for any other."""
    if not modulus or len(modulus) > 512:
        raise InvalidArgument("RSA modulus must be 1..512 bytes")
    if not 0 < exponent < 1 << 32:
        raise InvalidArgument("RSA exponent must fit 32 bits")
    raw = exponent.to_bytes((exponent.bit_length() + 7) // 8, "big")
    exponent = int.from_bytes(raw.ljust(4, b"\0"), "little")
    attributes = TPMA_OBJECT_DECRYPT | TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_USERWITHAUTH
    public = struct.pack(">HHIH", TPM_ALG_RSA, HASH_ALG_IDS["sha256"], attributes, 0)
    public += struct.pack(">HHHI", TPM_ALG_NULL, TPM_ALG_NULL, len(modulus) * 8, exponent)
    public += struct.pack(">H", len(modulus)) + modulus
    return struct.pack(">H", HASH_ALG_IDS["sha256"]) + hashlib.sha256(public).digest()


def _check_previous(previous: bytes, session_alg: str) -> None:
    if len(previous) != HASH_SIZES[hash_name(session_alg)]:
        raise InvalidArgument(f"a {session_alg} policy digest is "
                              f"{HASH_SIZES[session_alg]} bytes, not {len(previous)}")
