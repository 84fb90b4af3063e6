"""newc cpio archives exactly as systemd-stub generates them (formats layer).

Facts (systemd src/boot/cpio.c, uki.md §5.1): magic "070701", thirteen
8-digit lowercase hex fields (ino counting from 1 per archive, mode, uid 0,
gid 0, nlink 1, mtime 0, size, dev 0/0, rdev 0/0, name size with NUL,
check 0); header+name and data are each NUL-padded to 4 bytes relative to
the archive start; leading directories come first (intermediate ones 0555,
the last with the requested mode); the trailer record is a fixed string whose
name size is written in uppercase ("0000000B"). Being byte-exact matters:
the stub's archives are what an initrd would have received at a firmware boot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

S_IFREG = 0o100000
S_IFDIR = 0o040000
MAGIC = b"070701"
TRAILER = (MAGIC + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B"
           + b"00000000" + b"TRAILER!!!\0\0\0\0")
MAX_MEMBER = 0xFFFFFFFF


class CpioError(ValueError):
    """A cpio archive that cannot be read (only raised by the reader)."""


def _header(ino: int, mode: int, size: int, name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    return MAGIC + b"".join(b"%08x" % f for f in fields) + name + b"\0"


def _pad4(buf: bytearray) -> None:
    buf += bytes(-len(buf) % 4)


def literal_archive(directory: str, filename: str, data: bytes, *,
                    dir_mode: int = 0o555, file_mode: int = 0o444) -> bytes:
    """One file in one archive, with its leading directories: the stub's
    `pack_cpio_literal` (used for `.extra/os-release`, `.extra/profile`,
    `.extra/tpm2-pcr-signature.json`, `.extra/tpm2-pcr-public-key.pem`)."""
    return archive(directory, {filename: data}, dir_mode=dir_mode, file_mode=file_mode)


def archive(directory: str, files: dict[str, bytes], *, dir_mode: int = 0o555,
            file_mode: int = 0o444) -> bytes:
    """Several files under one directory, sorted by name (the stub's
    `pack_cpio` for credentials/sysexts sorts with strcmp16; for ASCII names
    that is byte order)."""
    buf = bytearray()
    ino = 1
    parts = directory.split("/")
    for depth in range(1, len(parts) + 1):
        if not parts[depth - 1]:
            continue
        path = "/".join(parts[:depth]).encode()
        mode = dir_mode if depth == len(parts) else 0o555
        buf += _header(ino, S_IFDIR | mode, 0, path)
        ino += 1
        _pad4(buf)
    for name in sorted(files):
        content = files[name]
        if len(content) > MAX_MEMBER:
            raise ValueError(f"cpio member {name} is larger than 4 GiB")
        buf += _header(ino, S_IFREG | file_mode, len(content), f"{directory}/{name}".encode())
        ino += 1
        _pad4(buf)
        buf += content
        _pad4(buf)
    buf += TRAILER
    return bytes(buf)


@dataclass(frozen=True)
class Member:
    name: str
    mode: int
    data: bytes


def read_newc(data: bytes) -> Iterator[Member]:
    """Walk concatenated newc archives (as the kernel does, skipping zero
    padding between them); for tests and for checking built initrds."""
    pos = 0
    while pos < len(data):
        if data[pos:pos + 4] == b"\0\0\0\0":
            pos += 4
            continue
        if data[pos:pos + 6] != MAGIC:
            raise CpioError(f"no newc magic at offset {pos} (compressed or not a cpio?)")
        if pos + 110 > len(data):
            raise CpioError(f"truncated cpio header at offset {pos}")
        try:
            fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CpioError(f"bad cpio header at offset {pos}") from None
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        if name_end > len(data) or namesize == 0:
            raise CpioError(f"cpio name beyond the end at offset {pos}")
        name = data[pos + 110: name_end - 1].decode("utf-8", "replace")
        body = name_end + (-name_end % 4)
        end = body + size
        if end > len(data):
            raise CpioError(f"cpio member {name} extends beyond the end")
        pos = end + (-end % 4)
        if name == "TRAILER!!!":
            continue
        yield Member(name=name, mode=mode, data=data[body:end])
