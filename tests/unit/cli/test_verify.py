"""`relaunchctl verify` (relaunchd.cli.verify): exit 0 only when a signature verifies
against a given certificate — the same verdicts as sbverify, the independent oracle — 1
when none does, 2 for an invalid image or certificate; --json says why."""

from __future__ import annotations

import json

import pytest

from relaunchd.cli import main
from support import ukibuild


@pytest.fixture(scope="module")
def images(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("verify")
    plain = ukibuild.build_uki(ukibuild.UkiSpec([(".osrel", b"ID=v\n"),
                                                 (".linux", b"MZ" + bytes(3000))]),
                               d / "plain.efi")
    signed = ukibuild.sign(plain, keys["db"], d / "signed.efi")
    tampered = d / "tampered.efi"
    data = bytearray(signed.read_bytes())
    data[0x600] ^= 0xFF                               # inside a signed section
    tampered.write_bytes(bytes(data))
    return {"plain": plain, "signed": signed, "tampered": tampered}


@pytest.mark.parametrize(("image", "key", "code"), [
    ("signed", "db", 0), ("signed", "other", 1), ("plain", "db", 1), ("tampered", "db", 1)])
def test_verdicts_agree_with_sbverify(images, keys, capsys, image, key, code):
    assert ukibuild.sbverify(images[image], keys[key].cert) is (code == 0)
    assert main(["verify", "--cert", str(keys[key].cert), str(images[image])]) == code
    out = capsys.readouterr().out
    if code == 0:
        assert out == f"{images[image]}: signature OK, signed by {keys['db'].subject}\n"
    else:
        assert "verification FAILED" in out


def test_any_of_several_certificates(images, keys):
    assert main(["verify", "--cert", str(keys["other"].cert), "--cert",
                 str(keys["db"].cert), str(images["signed"])]) == 0


def test_json(images, keys, capsys):
    assert main(["verify", "--json", "--cert", str(keys["other"].cert),
                 str(images["signed"])]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(images["signed"])
    assert report["signed"] is True and report["verified"] is False
    assert report["digest_ok"] == [True] and report["reasons"]


def test_invalid_inputs_exit_2(images, keys, tmp_path, capsys):
    bad_cert = tmp_path / "bad.pem"
    bad_cert.write_text("nope")
    assert main(["verify", "--cert", str(bad_cert), str(images["signed"])]) == 2
    assert "InvalidArgument" in capsys.readouterr().err
    not_pe = tmp_path / "x.efi"
    not_pe.write_bytes(b"not a PE")
    assert main(["verify", "--cert", str(keys["db"].cert), str(not_pe)]) == 2
    assert "InvalidImage" in capsys.readouterr().err
    link = tmp_path / "link.efi"
    link.symlink_to(images["signed"])
    assert main(["verify", "--cert", str(keys["db"].cert), str(link)]) == 2
    assert main(["verify", "--follow-symlinks", "--cert", str(keys["db"].cert),
                 str(link)]) == 0
