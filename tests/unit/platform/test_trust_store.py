"""Trusted certificates from files (relaunchd.platform.trust_store): PEM bundles and DER,
and a named InvalidArgument naming the file for anything else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relaunchd.errors import InvalidArgument
from relaunchd.platform import trust_store
from support.path_cases import NOBODY


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


# ---------------------------------------------------------------- where certificate files may be


def test_certificate_files_need_a_path_only_root_controls(image_tree, keys, mode):
    cert = image_tree / "db.pem"
    cert.write_bytes(keys["db"].cert.read_bytes())
    os.chmod(cert, 0o644)
    assert trust_store.load_certificates([str(cert)])
    os.chmod(cert, 0o666)
    with pytest.raises(InvalidArgument, match="db.pem: is writable by non-root users"):
        trust_store.load_certificates([str(cert)])
    os.chmod(cert, 0o644)
    os.chown(cert, NOBODY, NOBODY)
    with pytest.raises(InvalidArgument, match="cannot read certificate .*owned by uid 65534"):
        trust_store.load_certificates([str(cert)])
    os.chown(cert, 0, 0)
    evil = image_tree / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, NOBODY, NOBODY)
    (evil / "db.pem").symlink_to(cert)
    with pytest.raises(InvalidArgument, match=f"{evil} is owned by uid 65534"):
        trust_store.load_certificates([str(evil / "db.pem")])
    # A root link in a root directory (as /etc/ssl/certs/*.pem) is followed.
    (image_tree / "link.pem").symlink_to(cert)
    assert trust_store.load_certificates([str(image_tree / "link.pem")])
    fifo = image_tree / "fifo.pem"
    os.mkfifo(fifo, 0o644)
    with pytest.raises(InvalidArgument, match="is a FIFO, not a regular file"):
        trust_store.load_certificates([str(fifo)])


