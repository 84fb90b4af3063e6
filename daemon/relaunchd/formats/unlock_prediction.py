"""Will a TPM-sealed volume unlock after a relaunch? (formats layer: values in, verdict out)

A kexec relaunch resets no PCR. At the moment the new boot unlocks a volume, each
PCR holds today's value, extended by what the old system measures on its way down
and by what the new boot measures before that unlock. The caller describes those
extends (`Extend`, per PCR); this module computes the policy digest each sealing
(luks_tokens.TpmSealing) would see and compares it with the one the sealed object
demands:

- the literal part: PolicyPCR over the predicted values (tpm_policy), after
  PolicyAuthorize when the token is also signed, then PolicyAuthValue for a PIN —
  systemd 252's session order (tpm2_make_policy_session);
- the signed part: the new boot can only satisfy PolicyAuthorize with a signature
  for PolicyPCR(tpm2_pubkey_pcrs) over the predicted values; the new boot's
  signature file is the staged image's `.pcrsig` (systemd-stub hands it to the
  initrd as /.extra/tpm2-pcr-signature.json, and relaunchd's initrd does the same),
  so the question is whether `.pcrsig` holds that policy;
- stale PCRs: a policy that still holds only because PCRs that measure the boot
  chain (4, 8, 9, 12, 13, and 11 when nothing extends it) keep the *old* boot's
  values attests a kernel that no longer runs.

Whether it unlocks is decided on digests only: a value that changes in a way not
known in advance (relaunchd's own PCR 23 measurement without its digests, a DRTM
reset) is reported as not unlocking, since a policy cannot have been made for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from relaunchd.errors import InvalidArgument, InvalidVolume
from relaunchd.formats import tpm_policy
from relaunchd.formats.luks_tokens import TpmSealing
from relaunchd.formats.pcr11 import PcrSigEntry
from relaunchd.formats.slrt import DRTM_PCR_RANGE

# PCRs that measure the boot chain in a firmware boot (TCG PC Client Platform Firmware
# Profile §3.3.4 for 4 and 8/9 as GRUB and the Linux EFI stub use them; systemd's
# PCR registry for 11-13): after a kexec they keep the old boot's values.
BOOT_CHAIN_PCRS = {
    4: "the boot loader and kernel images",
    8: "GRUB's command line and commands",
    9: "the files GRUB or the kernel's EFI stub loaded (initrd)",
    11: "the unified kernel image (systemd-stub)",
    12: "systemd-stub's command line, credentials and add-ons",
    13: "systemd-stub's system extensions",
}
# Reset and extended by a dynamic launch (TXT/SKINIT); sealing against them survives
# a DRTM relaunch of a known image. Never touched by a plain kexec.
DRTM_RESET_PCRS = frozenset(DRTM_PCR_RANGE)     # what a dynamic launch resets

REMEDY_RE_ENROL = ("re-enrol against PCRs a relaunch keeps, e.g. `systemd-cryptenroll "
                   "--wipe-slot=tpm2 --tpm2-device=auto --tpm2-pcrs=7 DEVICE`; keep a "
                   "recovery key (`systemd-cryptenroll --recovery-key DEVICE`) or network "
                   "unlock (clevis tang) for the boot that needs it; long term, seal against "
                   "the DRTM PCRs 17-22 a dynamic launch resets and measures")
REMEDY_SIGNED = ("after a kexec PCR 11 never holds a firmware boot's value, so no `.pcrsig` "
                 "can sign it: add a literal enrolment against PCRs a relaunch keeps "
                 "(`--tpm2-pcrs=7`), a recovery key or network unlock (clevis tang)")
REMEDY_STALE = ("the policy no longer attests the running kernel: re-enrol against PCR 7 "
                "(Secure Boot policy) plus a signed PCR 11 policy for firmware boots, or "
                "against the DRTM PCRs 17-22")
REMEDY_PIN = "the token needs its PIN at unlock: someone (or a key agent) must enter it"


@dataclass(frozen=True)
class Extend:
    """One measurement into a PCR between now and the unlock, in order."""

    label: str                                  # who measures what, for the reason
    digests: Mapping[str, bytes] | None = None  # bank -> digest; None: not known in advance


@dataclass(frozen=True)
class RelaunchModel:
    """What a relaunch does to the PCRs until one volume's unlock in the new boot."""

    extends: Mapping[int, Sequence[Extend]] = field(default_factory=dict)
    resets: frozenset[int] = frozenset()        # reset then extended with unknown values
    pcrsig: Sequence[PcrSigEntry] | None = None  # the staged image's; None: no image known
    describe: str = "kexec"


@dataclass(frozen=True)
class SealingVerdict:
    token_id: int
    source: str
    pcrs: tuple[int, ...]
    pubkey_pcrs: tuple[int, ...]
    bank: str
    matches_now: bool
    unlocks_after_relaunch: bool
    stale_pcrs: tuple[int, ...]
    reason: str
    remedy: str | None


def predicted_values(current: Mapping[int, bytes], bank: str, pcrs: Sequence[int],
                     model: RelaunchModel) -> tuple[dict[int, bytes], list[str]]:
    """The values of `pcrs` at the unlock, and why any could not be predicted."""
    values: dict[int, bytes] = {}
    unknown: list[str] = []
    for pcr in pcrs:
        if pcr not in current:
            raise InvalidArgument(f"no current {bank} value for PCR {pcr}")
        if pcr in model.resets:
            unknown.append(f"PCR {pcr} is reset and measured by the dynamic launch")
            continue
        value = current[pcr]
        for extend in model.extends.get(pcr, ()):
            measured = extend.digests.get(bank) if extend.digests is not None else None
            if measured is None:
                unknown.append(f"PCR {pcr}: {extend.label}")
                value = None
                break
            value = tpm_policy.extended(bank, value, measured)
        if value is not None:
            values[pcr] = value
    return values, unknown


def policy_digest(sealing: TpmSealing, values: Mapping[int, bytes]) -> bytes:
    """The digest a systemd-tpm2 / clevis session reaches with these PCR values."""
    alg = sealing.session_alg
    if sealing.pubkey_pcrs:
        digest = tpm_policy.policy_authorize(signing_key_name(sealing), session_alg=alg)
    else:
        digest = tpm_policy.empty_policy(alg)
    if sealing.pcrs:
        selection = [tpm_policy.PcrSelection(sealing.bank, sealing.pcrs)]
        digest = tpm_policy.policy_pcr(digest, selection, {sealing.bank: values}, alg)
    if sealing.pin:
        digest = tpm_policy.policy_auth_value(digest, alg)
    return digest


def signing_key_name(sealing: TpmSealing) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(sealing.pubkey_pem or b"")
    except (ValueError, TypeError):
        raise InvalidVolume(f"token {sealing.token_id}: tpm2_pubkey is not a PEM key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidVolume(f"token {sealing.token_id}: systemd 252 signs PCR policies "
                            "with RSA keys only")
    numbers = key.public_numbers()
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return tpm_policy.rsa_signing_key_name(modulus, numbers.e)


def public_key_fingerprint(pem: bytes) -> str:
    """`pkfp` of a `.pcrsig` entry: SHA-256 of the key's i2d_PublicKey() DER — for
    RSA the PKCS#1 RSAPublicKey, not the SubjectPublicKeyInfo (systemd 252
    src/shared/openssl-util.c, pubkey_fingerprint)."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    der = load_pem_public_key(pem).public_bytes(Encoding.DER, PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


def assess(sealing: TpmSealing, current: Mapping[str, Mapping[int, bytes]],
           model: RelaunchModel) -> SealingVerdict:
    """One sealing: does its policy hold now, and at the unlock after the relaunch?"""
    bank = sealing.bank
    watched = tuple(sorted(set(sealing.pcrs) | set(sealing.pubkey_pcrs)))
    now = {pcr: current.get(bank, {}).get(pcr) for pcr in watched}
    missing = [pcr for pcr, value in now.items() if value is None]
    if missing:
        raise InvalidArgument(f"no current {bank} value for PCR(s) {missing}")
    now_values = {pcr: value for pcr, value in now.items() if value is not None}
    matches_now = policy_digest(sealing, now_values) == sealing.policy_hash
    after, unknown = predicted_values(now_values, bank, watched, model)
    reasons: list[str] = []
    remedy: str | None = None
    literal_ok = not unknown and policy_digest(sealing, after) == sealing.policy_hash
    if unknown:
        reasons.append("not predictable: " + "; ".join(unknown))
    elif not literal_ok:
        changed = [pcr for pcr in watched if after[pcr] != now_values[pcr]]
        if not matches_now:
            reasons.append(f"the policy over PCR(s) {_list(watched)} ({bank}) does not hold "
                           "even now: a PCR changed since enrolment, and a relaunch resets "
                           "none")
        elif changed:
            reasons.append(f"PCR(s) {_list(changed)} change before the unlock: "
                           + "; ".join(e.label for pcr in changed
                                       for e in model.extends.get(pcr, ())))
        else:
            reasons.append("the predicted policy digest differs from the token's")
    signed_ok = True
    if literal_ok and sealing.pubkey_pcrs:
        signed_ok, why = _signed_policy_holds(sealing, after, model)
        reasons.append(why)
    unlocks = literal_ok and signed_ok
    stale: tuple[int, ...] = ()
    if unlocks:
        stale = tuple(pcr for pcr in sealing.pcrs if pcr in BOOT_CHAIN_PCRS
                      and not model.extends.get(pcr) and pcr not in model.resets)
        reasons.insert(0, f"the policy over PCR(s) {_list(watched)} ({bank}) holds after "
                          f"the {model.describe}")
        if stale:
            reasons.append("only because PCR(s) " + ", ".join(
                f"{pcr} ({BOOT_CHAIN_PCRS[pcr]})" for pcr in stale)
                + " keep the old boot's values")
            remedy = REMEDY_STALE
        if sealing.pin:
            reasons.append("with the token's PIN")
            remedy = remedy or REMEDY_PIN
    else:
        remedy = REMEDY_SIGNED if literal_ok and sealing.pubkey_pcrs else REMEDY_RE_ENROL
    return SealingVerdict(token_id=sealing.token_id, source=sealing.source, pcrs=sealing.pcrs,
                          pubkey_pcrs=sealing.pubkey_pcrs, bank=bank, matches_now=matches_now,
                          unlocks_after_relaunch=unlocks, stale_pcrs=stale,
                          reason="; ".join(reasons), remedy=remedy)


def _signed_policy_holds(sealing: TpmSealing, values: Mapping[int, bytes],
                         model: RelaunchModel) -> tuple[bool, str]:
    pcrs = sealing.pubkey_pcrs
    if model.pcrsig is None:
        return False, (f"signed policy over PCR(s) {_list(pcrs)}: no staged image whose "
                       "`.pcrsig` could sign the predicted values")
    wanted = tpm_policy.policy_pcr(
        tpm_policy.empty_policy(), [tpm_policy.PcrSelection(sealing.bank, pcrs)],
        {sealing.bank: values})
    fingerprint = public_key_fingerprint(sealing.pubkey_pem) if sealing.pubkey_pem else None
    for entry in model.pcrsig:
        if entry.bank == sealing.bank and tuple(sorted(entry.pcrs)) == tuple(sorted(pcrs)) \
                and entry.policy == wanted \
                and (entry.pkfp is None or fingerprint is None or entry.pkfp == fingerprint):
            return True, (f"the staged image's `.pcrsig` signs the predicted PCR(s) "
                          f"{_list(pcrs)}")
    return False, (f"the staged image's `.pcrsig` does not sign the predicted PCR(s) "
                   f"{_list(pcrs)} ({sealing.bank}): it signs firmware-boot values, and "
                   "after a kexec the PCRs carry the old boot's measurements")


def _list(pcrs: Sequence[int]) -> str:
    return "+".join(str(p) for p in pcrs)
