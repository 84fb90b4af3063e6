"""The verdict on an image's Authenticode signatures, as a plain record (formats layer).

Kept apart from `authenticode` so that reporting on an unsigned image does not import
cryptography and asn1crypto (~40 ms, as long as hashing 60 MB): `inspect` of an
unsigned UKI needs only this record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SignatureReport:
    signed: bool
    signers: list[str]              # signer subject per signature, table order
    digest_ok: list[bool]           # image digest matches, per signature
    verified: bool                  # some signature verifies and chains to a trusted cert
    verified_by: str | None         # subject of the first signer that verified
    reasons: list[str]              # why each failing signature failed


def unsigned() -> SignatureReport:
    return SignatureReport(signed=False, signers=[], digest_ok=[], verified=False,
                           verified_by=None, reasons=["image is not signed"])
