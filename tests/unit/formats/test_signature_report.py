"""The signature verdict record (relaunchd.formats.signature_report): the verdict on an
unsigned image, a frozen record, and a module that imports no cryptography (its reason to
exist apart from `authenticode`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from relaunchd.formats import signature_report
from relaunchd.formats.signature_report import SignatureReport


def test_an_unsigned_image_is_not_verified_and_says_why():
    report = signature_report.unsigned()
    assert report == SignatureReport(signed=False, signers=[], digest_ok=[], verified=False,
                                     verified_by=None, reasons=["image is not signed"])
    # what `inspect --json` prints under "signature"
    assert dataclasses.asdict(report) == {
        "signed": False, "signers": [], "digest_ok": [], "verified": False,
        "verified_by": None, "reasons": ["image is not signed"]}


def test_each_call_is_a_fresh_record():
    one, two = signature_report.unsigned(), signature_report.unsigned()
    one.reasons.append("changed by a caller")
    assert two.reasons == ["image is not signed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.verified = True   # type: ignore[misc]


def test_importing_it_imports_no_cryptography():
    code = ("import sys; import relaunchd.formats.signature_report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cryptography', 'asn1crypto', 'pefile')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
