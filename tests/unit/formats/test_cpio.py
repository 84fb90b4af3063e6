"""Stub-exact cpio bytes (newc, as systemd-stub builds its .extra archives), checked
against the documented format and GNU cpio."""

from __future__ import annotations

import subprocess

import pytest

from relaunchd.formats import cpio


def hexfields(*values: int) -> bytes:
    return b"".join(b"%08x" % v for v in values)


def test_literal_archive_bytes_match_the_documented_format():
    got = cpio.literal_archive(".extra", "os-release", b"ID=x\n")
    # directory record: ino 1, S_IFDIR|0555, nlink 1, namesize 7 (".extra\0")
    d = b"070701" + hexfields(1, 0o40555, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, 0) + b".extra\0"
    d += bytes(-len(d) % 4)
    # file record: ino 2, S_IFREG|0444, size 5, namesize 18 (".extra/os-release\0")
    f = b"070701" + hexfields(2, 0o100444, 0, 0, 1, 0, 5, 0, 0, 0, 0, 18, 0)
    f += b".extra/os-release\0"
    f += bytes(-(len(d) + len(f)) % 4)
    body = b"ID=x\n" + bytes(-(len(d) + len(f) + 5) % 4)
    trailer = (b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B"
               + b"00000000" + b"TRAILER!!!\0\0\0\0")
    assert got == d + f + body + trailer
    assert len(got) % 4 == 0


def test_gnu_cpio_reads_our_archives(tmp_path):
    data = (cpio.literal_archive(".extra", "profile", b"ID=debug\n")
            + cpio.literal_archive(".extra", "os-release", b"ID=debian\n"))
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing[:2] == [".extra", ".extra/profile"]
    members = {m.name: m.data for m in cpio.read_newc(data)}
    assert members[".extra/os-release"] == b"ID=debian\n"
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / ".extra" / "profile").read_bytes() == b"ID=debug\n"


def test_nested_directories_get_0555_parents():
    data = cpio.archive(".extra/credentials", {"b.cred": b"2", "a.cred": b"1"},
                        dir_mode=0o500, file_mode=0o400)
    members = list(cpio.read_newc(data))
    assert [(m.name, oct(m.mode)) for m in members] == [
        (".extra", "0o40555"), (".extra/credentials", "0o40500"),
        (".extra/credentials/a.cred", "0o100400"), (".extra/credentials/b.cred", "0o100400")]


def test_reader_rejects_garbage():
    with pytest.raises(cpio.CpioError):
        list(cpio.read_newc(b"\x1f\x8b compressed"))
    with pytest.raises(cpio.CpioError):
        list(cpio.read_newc(cpio.literal_archive(".extra", "x", b"abc")[:130]))
