"""Trusted certificates from files (relaunchd.platform.trust_store): PEM bundles and DER,
and a named InvalidArgument naming the file for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relaunchd.errors import InvalidArgument
from relaunchd.platform import trust_store


def test_load_certificates_pem_bundle_and_der(keys, tmp_path):
    bundle = tmp_path / "bundle.pem"
    pems = keys["db"].cert.read_bytes() + keys["other"].cert.read_bytes()
    bundle.write_bytes(b"comment\n" + pems)
    certs = trust_store.load_certificates([str(bundle)])
    assert [c.subject.rfc4514_string() for c in certs] == [keys["db"].subject,
                                                            keys["other"].subject]
    der = tmp_path / "db.der"
    der.write_bytes(certs[0].public_bytes(serialization.Encoding.DER))
    assert trust_store.load_certificates([str(der), str(bundle)])[0] == certs[0]


@pytest.mark.parametrize(("content", "fragment"), [
    (b"not a certificate", "not an X.509 certificate"),
    (b"", "not an X.509 certificate"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no CERTIFICATE"),
    (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "not valid base64"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not an X.509"),
])
def test_load_certificates_bad_files(tmp_path, content, fragment):
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument) as info:
        trust_store.load_certificates([str(path)])
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_load_certificates_missing_file(tmp_path):
    path = Path(tmp_path / "nope.pem")
    with pytest.raises(InvalidArgument, match="cannot read certificate"):
        trust_store.load_certificates([str(path)])
