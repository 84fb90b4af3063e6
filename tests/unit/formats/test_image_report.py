"""What `inspect` reports about a UKI (relaunchd.formats.image_report), computed in one pass:
section digests against the bytes that went into the image, PCR 11 against
`systemd-measure calculate`, the signature verdict against sbsign's signer, and the
pass's callbacks (progress, extra sinks, trust loaded after hashing).

The images are built from Debian's systemd-stub with objcopy (tests/support/ukibuild.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.formats import hashing, image_report, signature_report
from relaunchd.platform.image_files import open_image
from relaunchd.platform.trust_store import load_certificates
from support import ukibuild

SECTIONS = {".osrel": b'PRETTY_NAME="Report Linux"\nID=report\n', ".cmdline": b"quiet splash",
            ".uname": b"6.1.0-report", ".initrd": b"070701" + bytes(70000),
            ".linux": b"MZ" + bytes(30000)}


@pytest.fixture(scope="module")
def uki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    return ukibuild.build_uki(ukibuild.UkiSpec(list(SECTIONS.items())), d / "report.efi")


@pytest.fixture(scope="module")
def signed(uki, keys) -> Path:
    return ukibuild.sign(uki, keys["db"], uki.with_name("signed.efi"))


def report_of(path: Path, **kw) -> image_report.ImageReport:
    with open_image(str(path), confirm=False) as image:
        return image_report.inspect_image(image, **kw)


def test_section_digests_are_those_of_the_bytes_put_in(uki):
    report = report_of(uki)
    ours = {s.name: s for s in report.sections}
    for name, content in SECTIONS.items():
        assert ours[name].sha256 == hashlib.sha256(content).hexdigest(), name
        assert ours[name].size == len(content) and ours[name].used
    # the stub's own sections are listed (and hashed) too, in table order
    assert [s.index for s in report.sections] == list(range(len(report.sections)))
    assert {".text", ".sdmagic"} <= set(ours)


def test_pcr11_is_what_systemd_measure_calculates(uki, tmp_path):
    report = report_of(uki, banks=("sha256", "sha1"))
    files = {}
    for name in report.prediction.sections:
        path = tmp_path / name.name.lstrip(".")
        path.write_bytes(SECTIONS[name.name])
        files[name.name] = path
    expected = ukibuild.systemd_measure(files, ["sha256", "sha1"])
    for phase, banks in report.prediction.phases.items():
        assert {b: v.hex() for b, v in banks.items()} == expected[phase], phase
    # systemd's enum order; Debian 12's stub (252) does not measure .uname or .sbat yet
    # (253/254, uki.md §1.2)
    data = report.to_json()
    assert data["measured_sections"] == [".linux", ".osrel", ".cmdline", ".initrd"]
    assert [n["section"] for n in data["not_measured"]] == [".uname", ".sbat"]  # .sbat: the stub's


def test_the_report_of_an_unsigned_image(uki):
    report = report_of(uki)
    assert report.signature == signature_report.unsigned()
    assert (report.os_release["ID"], report.uname, report.cmdline) == (
        "report", "6.1.0-report", "quiet splash")
    assert report.machine == "x86_64" and report.profile is None and report.profiles == []
    assert report.stub_version is not None and report.warnings == []
    data = report.to_json()
    assert set(data) == {"path", "size", "machine", "profile", "sections", "os_release",
                         "uname", "cmdline", "sbat", "profiles", "stub_version", "signature",
                         "measured_sections", "not_measured", "pcr11", "pcr11_phases",
                         "pcrsig", "warnings"}
    assert data["size"] == uki.stat().st_size and data["pcrsig"] is None
    json.dumps(data)


def test_the_signature_verdict(signed, keys):
    calls = []

    def trusted():
        calls.append("loaded")
        return load_certificates([str(keys["db"].cert)])

    report = report_of(signed, trusted=trusted)
    assert calls == ["loaded"]                       # asked once, after the hash pass
    sig = report.signature
    assert sig.signed and sig.verified and sig.digest_ok == [True]
    assert sig.signers == sig.verified_by.split("\n") == [keys["db"].subject]
    untrusted = report_of(signed, trusted=load_certificates([str(keys["other"].cert)]))
    assert untrusted.signature.signed and not untrusted.signature.verified
    assert untrusted.signature.digest_ok == [True] and untrusted.signature.reasons


def test_progress_and_extra_sinks_ride_along(uki):
    seen: list[tuple[int, int]] = []
    initrd = hashlib.sha256()
    with open_image(str(uki)) as image:
        section = image.resolve(None).sections[".initrd"]
        sink = hashing.Sink(initrd, [(section.raw_offset, section.payload_size)])
        image_report.inspect_image(image, progress=lambda d, t: seen.append((d, t)),
                                   extra_sinks=[sink])
    assert initrd.hexdigest() == hashlib.sha256(SECTIONS[".initrd"]).hexdigest()
    assert seen and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_multi_profile_image_on_an_old_stub_is_warned_about(tmp_path):
    path = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b"ID=multi\n"), (".linux", b"MZ" + bytes(4096)),
        (".profile", b"ID=one\n"), (".cmdline", b"one"),
        (".profile", b"ID=two\n"), (".cmdline", b"two"),
    ], stub_version="252"), tmp_path / "multi.efi")
    report = report_of(path, profile=1)
    assert report.profile == 1 and report.cmdline == "two"
    assert any("predates multi-profile" in w for w in report.warnings)


def test_an_unsigned_report_needs_no_cryptography(uki):
    """The reason signature_report is a module of its own: inspecting an unsigned image
    never imports cryptography or asn1crypto (~40 ms)."""
    code = (
        "import sys\n"
        "from relaunchd.formats import image_report\n"
        "from relaunchd.platform.image_files import open_image\n"
        f"with open_image({str(uki)!r}) as image:\n"
        "    report = image_report.inspect_image(image)\n"
        "assert not report.signature.signed\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cryptography', 'asn1crypto')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
