"""The initrd systemd-stub hands the kernel (relaunchd.formats.initrd), as parts: in the
stub's order (uki.md §5.1: ucode add-ons reversed, .ucode, .initrd, the generated .extra
cpios, initrd add-ons), each padded to 4 bytes, written with file data moved by sendfile.
The generated archives are read back with GNU cpio, not relaunchd's reader."""

from __future__ import annotations

import os
import subprocess

import pytest

from relaunchd.formats import initrd
from relaunchd.formats.initrd import InitrdPart
from relaunchd.formats.pe import FileRange
from relaunchd.platform.image_files import open_image
from support import ukibuild

UCODE = b"kernel/x86/microcode/GenuineIntel.bin" + bytes(3)
INITRD = b"070701" + bytes(1001)                   # odd length: padding shows
OSREL = b"ID=initrd-test\n"
PCRPKEY = b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"


@pytest.fixture(scope="module")
def uki(tmp_path_factory):
    path = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", OSREL), (".pcrpkey", PCRPKEY), (".ucode", UCODE), (".initrd", INITRD),
        (".linux", b"MZ" + bytes(2000)),
    ]), tmp_path_factory.mktemp("initrd") / "x.efi")
    with open_image(str(path)) as image:
        yield image


def literal(label: str, data: bytes) -> InitrdPart:
    return InitrdPart(label=label, data=data)


def test_the_stubs_order(uki):
    parts = initrd.plan(uki, uki.resolve(None),
                        ucode_addons=[literal("u1", b"a"), literal("u2", b"b")],
                        initrd_addons=[literal("i1", b"c")])
    assert [p.label for p in parts] == [
        "u2", "u1", ".ucode", ".initrd", ".extra/tpm2-pcr-public-key.pem",
        ".extra/os-release", "i1"]


def test_parts_are_padded_to_four_bytes_and_sections_stay_references(uki):
    parts = {p.label: p for p in initrd.plan(uki, uki.resolve(None))}
    section = parts[".initrd"]
    assert isinstance(section.source, FileRange) and section.data == b""
    assert section.content_size == len(INITRD) == 1007 and section.size == 1008
    assert all(p.size % 4 == 0 for p in parts.values())
    assert initrd.total_size(list(parts.values())) == sum(p.size for p in parts.values())


def test_written_it_is_what_the_stub_would_concatenate(uki, tmp_path):
    parts = initrd.plan(uki, uki.resolve(None), initrd_addons=[literal("i1", b"xyz")])
    out = os.memfd_create("initrd")
    try:
        written = initrd.write(parts, out)
        data = os.pread(out, written + 1, 0)
    finally:
        os.close(out)
    assert written == len(data) == initrd.total_size(parts)

    def padded(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    assert data.startswith(padded(UCODE) + padded(INITRD))
    assert data.endswith(padded(b"xyz"))
    # Each generated part is one newc archive, as GNU cpio extracts it.
    offset, found = 0, {}
    for part in parts:
        piece = data[offset:offset + part.size]
        offset += part.size
        if part.label.startswith(".extra/"):
            target = tmp_path / part.label.replace("/", "_")
            target.mkdir()
            subprocess.run(["cpio", "-id", "--quiet"], input=piece, cwd=target, check=True,
                           timeout=30)
            found[part.label] = (target / part.label).read_bytes()
    assert found == {".extra/os-release": OSREL, ".extra/tpm2-pcr-public-key.pem": PCRPKEY}


def test_no_initrd_sections_no_parts(tmp_path):
    path = ukibuild.build_uki(ukibuild.UkiSpec([(".linux", b"MZ" + bytes(100))]),
                              tmp_path / "bare.efi")
    with open_image(str(path)) as image:
        assert initrd.plan(image, image.resolve(None)) == []


def test_first_in_place_needs_the_first_parts_data_already_there(uki):
    parts = initrd.plan(uki, uki.resolve(None))
    out = os.memfd_create("initrd")
    try:
        with pytest.raises(ValueError, match="does not hold the first part"):
            initrd.write(parts, out, first_in_place=True)
        os.write(out, UCODE)                         # the first part, as staging copies it
        written = initrd.write(parts, out, first_in_place=True)
        assert os.fstat(out).st_size == written == initrd.total_size(parts)
    finally:
        os.close(out)
