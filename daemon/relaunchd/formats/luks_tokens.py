"""TPM-sealed LUKS2 tokens: what each one binds the volume key to (formats layer).

systemd-tpm2 tokens, as systemd 252 writes them (src/shared/tpm2-util.c,
tpm2_make_luks2_json; read back by tpm2_parse_luks2_json):
  "type": "systemd-tpm2", "keyslots": ["N"],
  "tpm2-blob": base64 of TPM2B_PRIVATE || TPM2B_PUBLIC of the sealed key object,
  "tpm2-pcrs": [PCR numbers] — the literal PolicyPCR,
  "tpm2-pcr-bank": "sha1"|"sha256"|"sha384"|"sha512" (absent before systemd 250: sha256),
  "tpm2-primary-alg": "ecc"|"rsa",
  "tpm2-policy-hash": hex of the policy digest the object was created with,
  "tpm2-pin": bool (absent: false),
  "tpm2_pubkey_pcrs": [PCR numbers], "tpm2_pubkey": base64 PEM — the signed policy.
Note the last two are spelled with underscores, unlike the others ("We made the
mistake of using "-" in the field names", says the source). The policy session is
built in this order (tpm2_make_policy_session): PolicyAuthorize over
PolicyPCR(tpm2_pubkey_pcrs) when signed, then PolicyPCR(tpm2-pcrs), then
PolicyAuthValue when tpm2-pin; session hash SHA-256.

clevis tpm2 pin tokens (latchset/clevis src/pins/tpm2/clevis-encrypt-tpm2, and
`clevis luks bind` for the LUKS2 token): "type": "clevis", "jwe": {"protected":
base64url JSON with "clevis": {"pin": "tpm2", "tpm2": {"hash", "key", "pcr_bank",
"pcr_ids", "jwk_pub", "jwk_priv"}}}. The policy is `tpm2_createpolicy -g HASH
--policy-pcr -l BANK:IDS`, i.e. a single PolicyPCR with session hash HASH, and it
is kept only inside the sealed object: jwk_pub is the TPM2B_PUBLIC, whose
authPolicy is read here (TPM 2.0 Part 2 §12.2.4: type u16, nameAlg u16,
objectAttributes u32, authPolicy TPM2B_DIGEST).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

from relaunchd.errors import InvalidVolume
from relaunchd.formats import tpm_policy
from relaunchd.formats.luks2 import Luks2Header, token_keyslots

SYSTEMD_TPM2 = "systemd-tpm2"
CLEVIS = "clevis"


@dataclass(frozen=True)
class TpmSealing:
    """One TPM-bound way to unlock a volume, whatever tool wrote it."""

    source: str                      # "systemd-tpm2" | "clevis-tpm2"
    token_id: int
    keyslots: tuple[int, ...]
    bank: str                        # the PCR bank of both PCR policies
    pcrs: tuple[int, ...]            # literal PolicyPCR (may be empty)
    session_alg: str                 # the policy session's hash
    policy_hash: bytes               # the digest the sealed object demands
    pin: bool = False                # PolicyAuthValue: a PIN is needed as well
    pubkey_pcrs: tuple[int, ...] = ()   # signed PolicyPCR (PolicyAuthorize)
    pubkey_pem: bytes | None = None


def tpm_sealings(header: Luks2Header) -> list[TpmSealing]:
    """Every systemd-tpm2 and clevis-tpm2 token of a volume (other tokens ignored)."""
    found = []
    for token_id, token in sorted(header.tokens.items()):
        if token["type"] == SYSTEMD_TPM2:
            found.append(systemd_token(token_id, token))
        elif token["type"] == CLEVIS:
            sealing = clevis_token(token_id, token)
            if sealing is not None:
                found.append(sealing)
    return found


def systemd_token(token_id: int, token: dict[str, Any]) -> TpmSealing:
    where = f"systemd-tpm2 token {token_id}"
    pcrs = _pcr_list(token.get("tpm2-pcrs"), f"{where}: tpm2-pcrs")
    bank = token.get("tpm2-pcr-bank", "sha256")
    if not isinstance(bank, str) or bank.lower() not in tpm_policy.HASH_ALG_IDS:
        raise InvalidVolume(f"{where}: tpm2-pcr-bank {bank!r} unknown")
    policy_hex = token.get("tpm2-policy-hash")
    if not isinstance(policy_hex, str):
        raise InvalidVolume(f"{where}: tpm2-policy-hash missing")
    try:
        policy_hash = bytes.fromhex(policy_hex)
    except ValueError:
        raise InvalidVolume(f"{where}: tpm2-policy-hash is not hex") from None
    pin = token.get("tpm2-pin", False)
    if not isinstance(pin, bool):
        raise InvalidVolume(f"{where}: tpm2-pin is not a boolean")
    pubkey_pcrs = _pcr_list(token.get("tpm2_pubkey_pcrs", []), f"{where}: tpm2_pubkey_pcrs")
    pubkey = token.get("tpm2_pubkey")
    pem = _b64(pubkey, f"{where}: tpm2_pubkey") if pubkey is not None else None
    if pubkey_pcrs and pem is None:
        raise InvalidVolume(f"{where}: tpm2_pubkey_pcrs without tpm2_pubkey")
    blob = _b64(token.get("tpm2-blob"), f"{where}: tpm2-blob")
    sealed_policy = sealed_object_policy(blob, private_first=True, where=where)
    if sealed_policy != policy_hash:
        raise InvalidVolume(f"{where}: tpm2-policy-hash is not the sealed object's policy")
    return TpmSealing(source=SYSTEMD_TPM2, token_id=token_id,
                      keyslots=token_keyslots(token, token_id), bank=bank.lower(), pcrs=pcrs,
                      session_alg="sha256", policy_hash=policy_hash, pin=pin,
                      pubkey_pcrs=pubkey_pcrs, pubkey_pem=pem)


def clevis_token(token_id: int, token: dict[str, Any]) -> TpmSealing | None:
    """A clevis token sealed with its tpm2 pin; None for other pins (tang, sss)."""
    where = f"clevis token {token_id}"
    jwe = token.get("jwe")
    if not isinstance(jwe, dict) or not isinstance(jwe.get("protected"), str):
        raise InvalidVolume(f"{where}: no JWE protected header")
    try:
        protected = json.loads(_b64url(jwe["protected"], f"{where}: protected"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidVolume(f"{where}: protected header is not JSON") from None
    clevis = protected.get("clevis") if isinstance(protected, dict) else None
    if not isinstance(clevis, dict) or clevis.get("pin") != "tpm2":
        return None
    config = clevis.get("tpm2")
    if not isinstance(config, dict):
        raise InvalidVolume(f"{where}: tpm2 pin without its configuration")
    session_alg = str(config.get("hash", "sha256")).lower()
    if session_alg not in tpm_policy.HASH_ALG_IDS:
        raise InvalidVolume(f"{where}: hash {session_alg!r} unknown")
    ids = config.get("pcr_ids")
    if isinstance(ids, str):
        ids = [part for part in ids.split(",") if part.strip()]
    pcrs = _pcr_list(ids or [], f"{where}: pcr_ids", strings=True)
    bank = str(config.get("pcr_bank", "sha256" if not pcrs else "")).lower()
    if bank not in tpm_policy.HASH_ALG_IDS:
        raise InvalidVolume(f"{where}: pcr_bank {bank!r} unknown")
    public = _b64url(config.get("jwk_pub"), f"{where}: jwk_pub")
    policy = sealed_object_policy(public, private_first=False, where=where)
    return TpmSealing(source="clevis-tpm2", token_id=token_id,
                      keyslots=token_keyslots(token, token_id), bank=bank, pcrs=pcrs,
                      session_alg=session_alg, policy_hash=policy)


def sealed_object_policy(blob: bytes, *, private_first: bool, where: str) -> bytes:
    """authPolicy of the TPM2B_PUBLIC in `blob` (after a TPM2B_PRIVATE if
    `private_first`, as systemd stores it)."""
    offset = 0
    try:
        if private_first:
            (private_size,) = struct.unpack_from(">H", blob, 0)
            offset = 2 + private_size
        (public_size,) = struct.unpack_from(">H", blob, offset)
        public = blob[offset + 2:offset + 2 + public_size]
        if len(public) != public_size:
            raise struct.error("short")
        (policy_size,) = struct.unpack_from(">H", public, 8)   # after type, nameAlg, attrs
        policy = public[10:10 + policy_size]
        if len(policy) != policy_size:
            raise struct.error("short")
    except struct.error:
        raise InvalidVolume(f"{where}: sealed object is truncated") from None
    return policy


def _pcr_list(value: Any, where: str, strings: bool = False) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidVolume(f"{where} is not a list")
    out = []
    for item in value:
        if strings and isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int) \
                or not 0 <= item < tpm_policy.PCR_COUNT:
            raise InvalidVolume(f"{where}: {item!r} is not a PCR number")
        out.append(item)
    return tuple(out)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidVolume(f"{where} missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidVolume(f"{where} is not base64") from None


def _b64url(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidVolume(f"{where} missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidVolume(f"{where} is not base64url") from None
