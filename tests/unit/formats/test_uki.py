"""The UKI reader (relaunchd.formats.uki, opened through platform.image_files): bad input
gets a named InvalidImage, never a traceback, never a hang.

Built on a small real UKI (Debian's systemd stub plus a tiny payload) so every
mutation starts from the real PE layout."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidArgument, InvalidImage
from relaunchd.formats.uki import mangle_cmdline
from relaunchd.platform.image_files import open_image
from support import ukibuild


@pytest.fixture(scope="module")
def small_uki(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("small")
    path = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b"ID=test\n"), (".cmdline", b"quiet"), (".linux", b"MZ" + bytes(5000)),
    ]), d / "small.efi")
    return path.read_bytes()


def layout(data: bytes) -> dict:
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    nsec = struct.unpack_from("<H", data, pe + 6)[0]
    opt = struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + opt
    sections = {}
    for i in range(nsec):
        hdr = table + 40 * i
        name = data[hdr:hdr + 8].rstrip(b"\0").decode()
        sections[name] = hdr
    return {"pe": pe, "nsec": nsec, "table": table, "sections": sections}


def reject(path: Path, fragment: str, **kw) -> str:
    start = time.monotonic()
    with pytest.raises(InvalidImage) as info:
        open_image(str(path), **kw).close()
    assert time.monotonic() - start < 0.5, "rejection must be fast"
    message = str(info.value)
    assert fragment in message, message
    assert str(path) in message, "the message names the file"
    return message


def write(tmp_path: Path, data: bytes | bytearray, name: str = "bad.efi") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_small_uki_is_valid(small_uki, tmp_path):
    with open_image(str(write(tmp_path, small_uki))) as image:
        resolved = image.resolve()
        assert image.cmdline(resolved) == "quiet"


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.8, 0.95,
                                      0.999])
def test_truncations(small_uki, tmp_path, fraction):
    cut = int(len(small_uki) * fraction)
    reject(write(tmp_path, small_uki[:cut]), "")


def test_truncation_every_header_offset(small_uki, tmp_path):
    lay = layout(small_uki)
    end = lay["table"] + 40 * lay["nsec"]
    for cut in range(0, end + 8, 7):
        reject(write(tmp_path, small_uki[:cut]), "")


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d, lay: d.__setitem__(slice(0, 2), b"ZM"), "no MZ signature"),
    (lambda d, lay: struct.pack_into("<I", d, 0x3C, 0x7FFFFFF0), "beyond the end"),
    (lambda d, lay: d.__setitem__(slice(lay["pe"], lay["pe"] + 4), b"PX\0\0"), "no PE signature"),
    (lambda d, lay: struct.pack_into("<H", d, lay["pe"] + 4, 0x014C), "built for i386"),
    (lambda d, lay: struct.pack_into("<H", d, lay["pe"] + 6, 0), "no sections"),
    (lambda d, lay: struct.pack_into("<H", d, lay["pe"] + 6, 0xFFFF), "sections"),
    (lambda d, lay: struct.pack_into("<H", d, lay["pe"] + 20, 0xFFFF), "optional header size"),
    (lambda d, lay: struct.pack_into("<H", d, lay["pe"] + 24, 0x1234), "optional header magic"),
])
def test_corrupted_headers(small_uki, tmp_path, mutate, fragment):
    data = bytearray(small_uki)
    mutate(data, layout(small_uki))
    reject(write(tmp_path, data), fragment)


def test_section_outside_file(small_uki, tmp_path):
    data = bytearray(small_uki)
    hdr = layout(small_uki)["sections"][".linux"]
    struct.pack_into("<I", data, hdr + 20, len(data))  # PointerToRawData
    reject(write(tmp_path, data), "beyond the end")


def test_overlapping_sections_in_file(small_uki, tmp_path):
    data = bytearray(small_uki)
    secs = layout(small_uki)["sections"]
    ptr = struct.unpack_from("<I", data, secs[".osrel"] + 20)[0]
    struct.pack_into("<I", data, secs[".cmdline"] + 20, ptr)
    reject(write(tmp_path, data), "overlaps")


def test_overlapping_sections_in_memory(small_uki, tmp_path):
    data = bytearray(small_uki)
    secs = layout(small_uki)["sections"]
    va = struct.unpack_from("<I", data, secs[".osrel"] + 12)[0]
    struct.pack_into("<I", data, secs[".cmdline"] + 12, va)
    reject(write(tmp_path, data), "in memory")


def test_huge_virtual_size(small_uki, tmp_path):
    data = bytearray(small_uki)
    struct.pack_into("<I", data, layout(small_uki)["sections"][".linux"] + 8, 0xFFFFFFF0)
    reject(write(tmp_path, data), "VirtualSize")


def test_long_section_name(small_uki, tmp_path):
    data = bytearray(small_uki)
    hdr = layout(small_uki)["sections"][".cmdline"]
    data[hdr:hdr + 8] = b"/4\0\0\0\0\0\0"
    reject(write(tmp_path, data), "long name")


def test_no_linux_section(small_uki, tmp_path):
    data = bytearray(small_uki)
    hdr = layout(small_uki)["sections"][".linux"]
    data[hdr:hdr + 8] = b".linuy\0\0"
    reject(write(tmp_path, data), "lacks a .linux")


def test_missing_profile_is_a_named_error(small_uki, tmp_path):
    with open_image(str(write(tmp_path, small_uki))) as image, \
            pytest.raises(InvalidArgument, match="profile 3"):
        image.resolve(3)


def test_file_types(tmp_path):
    reject(write(tmp_path, b"", "empty.efi"), "empty file")
    reject(tmp_path, "directory")
    reject(tmp_path / "nope.efi", "no such file")
    reject(Path("/dev/null"), "character device")


def test_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "fifo.efi"
    os.mkfifo(fifo)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_try(fifo)), daemon=True)
    worker.start()
    worker.join(2)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert "FIFO" in result[0]


def test_socket(tmp_path):
    path = tmp_path / "sock.efi"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        reject(path, "socket")


def test_symlink_refused_by_default(small_uki, tmp_path):
    target = write(tmp_path, small_uki, "real.efi")
    link = tmp_path / "link.efi"
    link.symlink_to(target)
    reject(link, "symbolic link")
    with open_image(str(link), follow_symlinks=True) as image:
        assert image.resolve().sections[".linux"]


def _try(path: Path) -> str:
    try:
        open_image(str(path)).close()
    except InvalidImage as exc:
        return str(exc)
    return "accepted"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_never_crash(small_uki, tmp_path_factory, data):
    """Any byte flips in the headers: parse fully or fail with a named error."""
    blob = bytearray(small_uki)
    head = layout(small_uki)["table"] + 40 * layout(small_uki)["nsec"]
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, head - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = write(tmp_path_factory.mktemp("fuzz"), blob)
    try:
        with open_image(str(path)) as image:
            resolved = image.resolve()
            image.os_release(resolved)
            image.cmdline(resolved)
            image.stub_version()
    except (InvalidImage, InvalidArgument):
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deferred_pefile_check_gives_the_same_verdict(small_uki, tmp_path_factory, data):
    """Our own header parse plus pefile's cross-check later (what inspect and staging do
    so hashing can start first) accepts and refuses exactly what the one-step parse does."""
    blob = bytearray(small_uki)
    head = layout(small_uki)["table"] + 40 * layout(small_uki)["nsec"]
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, head - 1))] = data.draw(st.integers(0, 255))
    path = write(tmp_path_factory.mktemp("defer"), blob)
    deferred = "accepted"
    try:
        with open_image(str(path), confirm=False) as image:
            image.confirm_headers()
    except InvalidImage as exc:
        deferred = str(exc)
    assert deferred == _try(path)


def test_pefile_disagreeing_is_refused(small_uki, tmp_path, monkeypatch):
    """Two parsers reading one header differently is a crafted header: refused, naming
    the field, both when parsing at once and when inspect_image confirms later."""
    import pefile

    from relaunchd.formats import image_report

    class Skewed(pefile.PE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.OPTIONAL_HEADER.SizeOfImage += 0x1000

    path = write(tmp_path, small_uki)
    monkeypatch.setattr(pefile, "PE", Skewed)
    message = reject(path, "read differently by pefile: SizeOfImage")
    assert "SizeOfImage" in message
    with open_image(str(path), confirm=False) as image, pytest.raises(InvalidImage) as info:
        image_report.inspect_image(image, banks=("sha256",))
    assert "read differently by pefile" in str(info.value)


# --------------------------------------------------------------------------- .cmdline text

def test_cmdline_mangling_as_the_stub_does():
    assert mangle_cmdline("  quiet\n\tsplash \x7f x\n\n") == "quiet  splash   x"
    assert mangle_cmdline("") == ""
    assert mangle_cmdline("a\x00b") == "a b"
