"""`relaunchd --check-config` checks the trust files the configuration names (issue #14,
item 9): each must exist and hold at least one X.509 certificate, else InvalidConfig
naming the key, its line and the file, exit 2 — before, a missing file passed the check
and every Stage then failed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from relaunchd import daemon

VENV_BIN = Path(__file__).resolve().parents[3] / ".venv" / "bin"


def config_naming(tmp_path: Path, *certs: Path) -> Path:
    lines = ["# relaunchd test configuration", f"state_dir: {tmp_path}", "trust:",
             "  certificates:", *[f"    - {c}" for c in certs]]
    path = tmp_path / "relaunchd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def check(path: Path, capsys) -> tuple[int, str, str]:
    code = daemon.main(["--config", str(path), "--check-config"], make_engine=_no_engine)
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_engine(config, notify):
    raise AssertionError("--check-config must not build an engine")


def test_existing_certificates_pass(tmp_path, keys, capsys):
    code, out, err = check(config_naming(tmp_path, keys["db"].cert, keys["other"].cert), capsys)
    assert code == 0, err
    assert out.strip().endswith("OK")


def test_missing_certificate_file(tmp_path, keys, capsys):
    missing = tmp_path / "nope.pem"
    code, _, err = check(config_naming(tmp_path, keys["db"].cert, missing), capsys)
    assert code == 2
    # the second item, on line 6 of the file
    assert re.search(r"InvalidConfig: .*relaunchd\.yaml, line 6\b.*trust\.certificates\[1\]",
                     err), err
    assert str(missing) in err and "does not exist" in err


@pytest.mark.parametrize(("content", "why"), [
    (b"", "not an X.509 certificate"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "no CERTIFICATE"),
    (b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n", "base64"),
    (b"\x30\x03\x02\x01\x00", "not an X.509 certificate"),
], ids=["empty", "a public key", "bad base64", "bad DER"])
def test_certificate_file_that_does_not_parse(tmp_path, capsys, content, why):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    code, _, err = check(config_naming(tmp_path, bad), capsys)
    assert code == 2
    assert "InvalidConfig" in err and "line 5" in err and "trust.certificates[0]" in err
    assert why in err and str(bad) in err


def test_a_directory_is_not_a_certificate(tmp_path, capsys):
    code, _, err = check(config_naming(tmp_path, tmp_path), capsys)
    assert code == 2 and "trust.certificates[0]" in err and "line 5" in err


def test_installed_relaunchd(tmp_path):
    path = config_naming(tmp_path, tmp_path / "gone.pem")
    r = subprocess.run([str(VENV_BIN / "relaunchd"), "--config", str(path), "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "InvalidConfig" in r.stderr and "gone.pem" in r.stderr
    assert "Traceback" not in r.stderr
