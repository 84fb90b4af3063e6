"""PE/COFF headers (relaunchd.formats.pe), checked against binutils' objdump on Debian's
systemd stub and on a PE32 image built here from the PE/COFF specification's layout
(§2–§4), and the ranges the Authenticode digest covers, checked against the digest
sbsign put into a real signature (read with asn1crypto, not relaunchd's parser)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms, core

from relaunchd.errors import InvalidImage
from relaunchd.formats import pe
from support import ukibuild

STUB = ukibuild.STUB


def file_range(path: Path) -> tuple[int, pe.FileRange]:
    fd = os.open(path, os.O_RDONLY)
    return fd, pe.FileRange(fd, 0, os.fstat(fd).st_size)


def parse(path: Path, **kw) -> pe.PeHeaders:
    fd, image = file_range(path)
    try:
        return pe.parse_headers(image, **kw)
    finally:
        os.close(fd)


def objdump_sections(path: Path) -> list[tuple[str, int, int, int]]:
    """(name, size, vma, file offset) per section, as `objdump -h` prints them."""
    out = subprocess.run(["objdump", "-h", str(path)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)",
                      out, re.M)
    return [(name, int(size, 16), int(vma, 16), int(off, 16)) for name, size, vma, off in rows]


def objdump_private(path: Path) -> dict[str, str]:
    """The optional header fields and data directories `objdump -p` prints."""
    out = subprocess.run(["objdump", "-p", str(path)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    fields = dict(re.findall(r"^(\w+)\s+([0-9a-f]+)(?:\s|$)", out, re.M))
    for entry, rva, size in re.findall(r"^Entry (\w) ([0-9a-f]+) ([0-9a-f]+)", out, re.M):
        fields[f"dir{int(entry, 16)}"] = f"{rva} {size}"
    return fields


# --------------------------------------------------------------------------- against objdump


def test_the_stub_as_objdump_reads_it():
    headers = parse(STUB)
    fields = objdump_private(STUB)
    assert headers.machine_name == "x86_64" and headers.pe32_plus
    assert fields["Magic"] == "020b"
    assert headers.size_of_image == int(fields["SizeOfImage"], 16)
    assert headers.size_of_headers == int(fields["SizeOfHeaders"], 16)
    assert headers.subsystem == int(fields["Subsystem"], 16) == 10     # EFI application
    assert headers.number_of_rva_and_sizes == int(fields["NumberOfRvaAndSizes"], 16)
    # checksum_offset points at the CheckSum field objdump shows.
    data = STUB.read_bytes()
    assert struct.unpack_from("<I", data, headers.checksum_offset)[0] \
        == int(fields["CheckSum"], 16)
    assert headers.file_size == len(data) and not headers.signed
    ours = [(s.name, s.payload_size, s.virtual_address, s.raw_offset) for s in headers.sections]
    assert ours == objdump_sections(STUB)


def test_a_signed_image_locates_its_certificate_table(tmp_path, keys):
    signed = ukibuild.sign(STUB, keys["db"], tmp_path / "signed.efi")
    headers = parse(signed)
    rva, size = objdump_private(signed)["dir4"].split()       # the Security Directory
    assert (headers.cert_table_offset, headers.cert_table_size) == (int(rva, 16), int(size, 16))
    assert headers.signed and headers.cert_table_size > 0
    data = signed.read_bytes()
    assert struct.unpack_from("<II", data, headers.cert_dir_offset) == (
        headers.cert_table_offset, headers.cert_table_size)


def pe32(sections: list[tuple[bytes, bytes]], *, file_alignment: int = 0x200) -> bytes:
    """A minimal PE32 (i386) image laid out as the PE/COFF specification describes: DOS
    header with e_lfanew at 0x3C, "PE\\0\\0", the COFF header (§3.3), the PE32 optional
    header (§3.4: 96 bytes + 16 data directories) and 40-byte section headers (§4)."""
    nsec = len(sections)
    opt_size = 96 + 16 * 8
    headers_end = 0x40 + 4 + 20 + opt_size + 40 * nsec
    size_of_headers = -(-headers_end // file_alignment) * file_alignment
    raw, table, offset, va = b"", b"", size_of_headers, 0x1000
    for name, data in sections:
        padded = data.ljust(-(-len(data) // file_alignment) * file_alignment, b"\0")
        table += struct.pack("<8sIIIIIIHHI", name, len(data), va, len(padded), offset,
                             0, 0, 0, 0, 0x40000040)
        raw += padded
        offset += len(padded)
        va += 0x1000
    dos = b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x14C, nsec, 0, 0, 0, opt_size, 0x0102)
    opt = struct.pack("<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", 0x10B, 2, 40, 0, 0, 0, 0x1000,
                      0x1000, 0, 0x400000, 0x1000, file_alignment, 0, 0, 0, 0, 0, 0, 0,
                      va, size_of_headers, 0, 10, 0, 0, 0, 0, 0, 0, 16)
    opt += bytes(16 * 8)
    image = (dos + b"PE\0\0" + coff + opt + table).ljust(size_of_headers, b"\0")
    return image + raw


def test_a_pe32_image_built_from_the_specification(tmp_path):
    path = tmp_path / "pe32.efi"
    path.write_bytes(pe32([(b".text", b"\xc3" * 100), (b".data", b"hello" * 300)]))
    headers = parse(path)
    assert headers.machine_name == "i386" and headers.pe32_plus is False
    assert headers.optional_magic == 0x10B and headers.subsystem == 10
    fields = objdump_private(path)
    assert fields["Magic"] == "010b"
    assert headers.size_of_image == int(fields["SizeOfImage"], 16) == 0x3000
    assert headers.size_of_headers == int(fields["SizeOfHeaders"], 16)
    # PE32's data directories start 96 bytes into the optional header (PE32+: 112).
    assert headers.cert_dir_offset == 0x40 + 4 + 20 + 96 + 4 * 8
    # objdump adds ImageBase (0x400000) to each section's RVA.
    ours = [(s.name, s.payload_size, s.virtual_address + 0x400000, s.raw_offset)
            for s in headers.sections]
    assert ours == objdump_sections(path)


# --------------------------------------------------------------------------- refusals


def mutate(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


SECTION_TABLE = 0x40 + 4 + 20 + 96 + 16 * 8


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d[:0x30], "too small"),
    (lambda d: b"ZM" + d[2:], "no MZ signature"),
    (lambda d: mutate(d, 0x40, "<4s", b"PX\0\0"), "no PE signature"),
    (lambda d: mutate(d, 0x3C, "<I", 0x7FFFFFF0), "beyond the end of the file"),
    (lambda d: mutate(d, 0x40 + 4 + 2, "<H", 0), "has no sections"),
    (lambda d: mutate(d, 0x40 + 4 + 16, "<H", 12), "optional header size"),
    (lambda d: mutate(d, 0x40 + 24, "<H", 0x20C), "unknown optional header magic"),
    (lambda d: mutate(d, SECTION_TABLE, "<8s", b"/4"), "long name"),
    (lambda d: mutate(d, SECTION_TABLE, "<8s", b".t\xe9xt"), "non-ASCII name"),
    (lambda d: mutate(d, SECTION_TABLE, "<8s", b".t\0x"), "malformed name"),
    # .text's PointerToRawData beyond the end of the file
    (lambda d: mutate(d, SECTION_TABLE + 20, "<I", 0x100000), "extends beyond the end"),
    # .data's raw data starts inside .text's
    (lambda d: mutate(d, SECTION_TABLE + 40 + 20, "<I", 0x300), "overlaps section"),
    # .data's VirtualAddress inside .text's
    (lambda d: mutate(d, SECTION_TABLE + 40 + 12, "<I", 0x1000), "overlaps section"),
    # a VirtualSize far beyond its data
    (lambda d: mutate(d, SECTION_TABLE + 8, "<I", 0x7FFFFFFF), "far beyond"),
    # a certificate table outside the file
    (lambda d: mutate(d, 0x40 + 24 + 96 + 4 * 8, "<II", 0x400, 0x100000), "outside the file"),
])
def test_hostile_headers_are_named_errors(tmp_path, change, fragment):
    good = pe32([(b".text", b"\xc3" * 100), (b".data", b"hello" * 300)])
    path = tmp_path / "bad.efi"
    path.write_bytes(change(good))
    with pytest.raises(InvalidImage, match=fragment):
        parse(path, confirm=False)


def test_file_ranges_stay_inside_the_image(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 4)
    fd, whole = file_range(path)
    try:
        part = whole.sub(256, 512)
        assert part.pread(0, 4) == bytes(range(4)) and part.pread(508, 4) == bytes(range(252, 256))
        with pytest.raises(InvalidImage, match="outside"):
            part.pread(510, 4)
        with pytest.raises(InvalidImage, match="outside"):
            whole.sub(1000, 100)
        os.truncate(path, 600)                      # the file shrinks under us
        with pytest.raises(InvalidImage, match="shrank"):
            part.pread(400, 100)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- against sbsign


def _signed_digest(table: bytes) -> bytes:
    """The image digest in the first WIN_CERTIFICATE's SpcIndirectDataContent
    (Authenticode PE spec: DigestInfo is its last element), read with asn1crypto."""
    length, revision, kind = struct.unpack_from("<IHH", table, 0)
    assert (revision, kind) == (0x0200, 0x0002)      # WIN_CERT_TYPE_PKCS_SIGNED_DATA
    spc = cms.ContentInfo.load(table[8:length])["content"]["encap_content_info"]["content"]
    digest_info = core.Sequence.load(spc.parsed[1].dump())
    return core.OctetString.load(digest_info[1].dump()).native


def test_authenticode_ranges_hash_to_the_digest_sbsign_signed(tmp_path, keys):
    image = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b"ID=pe\n"), (".linux", b"MZ" + os.urandom(20000)),
    ]), tmp_path / "image.efi")
    signed = ukibuild.sign(image, keys["db"], tmp_path / "signed.efi")
    data = signed.read_bytes()
    headers = parse(signed)
    digest = hashlib.sha256()
    for offset, length in pe.authenticode_ranges(headers):
        digest.update(data[offset:offset + length])
    table = data[headers.cert_table_offset:headers.cert_table_offset + headers.cert_table_size]
    assert digest.digest() == _signed_digest(table)
    # The unsigned original hashes to the same digest: the signature is outside the ranges.
    plain = image.read_bytes()
    again = hashlib.sha256()
    for offset, length in pe.authenticode_ranges(parse(image)):
        again.update(plain[offset:offset + length])
    assert again.digest() == digest.digest()


# --------------------------------------------------------------------------- authenticode_ranges


def headers(sections: list[tuple[int, int]], *, size_of_headers: int = 0x400,
            file_size: int, table: tuple[int, int] = (0, 0)) -> pe.PeHeaders:
    return pe.PeHeaders(
        machine=0x8664, pe32_plus=True, subsystem=10, size_of_headers=size_of_headers,
        size_of_image=0x10000, checksum_offset=0xD8, cert_dir_offset=0x128,
        cert_table_offset=table[0], cert_table_size=table[1],
        sections=tuple(pe.PeSection(name=f".s{i}", index=i, virtual_address=0x1000 * (i + 1),
                                    virtual_size=size, raw_offset=off, raw_size=size,
                                    characteristics=0)
                       for i, (off, size) in enumerate(sections)),
        file_size=file_size)


HEADER_RANGES = [(0, 0xD8), (0xDC, 0x128 - 0xDC), (0x130, 0x400 - 0x130)]


def test_ranges_skip_checksum_and_cert_entry_and_sort_sections():
    h = headers([(0x600, 0x200), (0x400, 0x200), (0x800, 0)], file_size=0x900,
                table=(0x800, 0x100))
    assert pe.authenticode_ranges(h) == [*HEADER_RANGES, (0x400, 0x200), (0x600, 0x200)]


def test_ranges_include_trailing_data_before_the_table():
    h = headers([(0x400, 0x200)], file_size=0x700, table=(0x680, 0x80))
    assert pe.authenticode_ranges(h)[-1] == (0x600, 0x80)


def test_ranges_of_unsigned_image_cover_the_tail():
    h = headers([(0x400, 0x200)], file_size=0x640)
    assert pe.authenticode_ranges(h)[-1] == (0x600, 0x40)


def test_ranges_leave_out_a_table_in_the_middle():
    h = headers([(0x400, 0x200)], file_size=0x800, table=(0x600, 0x100))
    assert pe.authenticode_ranges(h)[-2:] == [(0x400, 0x200), (0x700, 0x100)]


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"sections": [(0x400, 0x200), (0x800, 0x200)], "file_size": 0xA00}, "gaps"),
    ({"sections": [(0x400, 0x200)], "size_of_headers": 0x600, "file_size": 0x600},
     "overlaps"),
    ({"sections": [(0x400, 0x200)], "size_of_headers": 0x100, "file_size": 0x600},
     "not inside SizeOfHeaders"),
    ({"sections": [(0x400, 0x200)], "file_size": 0x800, "table": (0x500, 0x100)},
     "inside the signed part"),
])
def test_unsupported_layouts(kw, fragment):
    with pytest.raises(InvalidImage, match=fragment):
        pe.authenticode_ranges(headers(**kw))
