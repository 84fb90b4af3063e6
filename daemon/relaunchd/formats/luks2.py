"""The LUKS2 header: binary header and JSON metadata (formats layer).

Source: cryptsetup's "LUKS2 On-Disk Format Specification" (docs/on-disk-format-luks2.pdf,
version 1.1.x), §2 and §3:

- Two copies of the header, each a 4096-byte binary header followed by the JSON
  area, `hdr_size` bytes in all (16 KiB by default; a power of two from 16 KiB to
  4 MiB). The primary is at offset 0, the secondary right after it (offset = the
  primary's hdr_size); a reader that cannot trust the primary tries every allowed
  size as the secondary's offset (Table 2).
- Binary header, big-endian: magic[6] "LUKS\\xba\\xbe" (primary) / "SKUL\\xba\\xbe"
  (secondary) @0, version u16 = 2 @6, hdr_size u64 @8, seqid u64 @16, label[48] @24,
  checksum_alg[32] @72, salt[64] @104, uuid[40] @168, subsystem[48] @208,
  hdr_offset u64 @256, padding[184] @264, csum[64] @448, padding to 4096.
- csum: checksum_alg over the whole hdr_size area with the csum field zeroed.
- JSON area: a NUL-terminated JSON object with the mandatory sections keyslots,
  tokens, segments, digests, config; objects keyed by decimal strings. Of two
  valid copies the one with the higher seqid is current (§2.1).

Only reading: nothing here ever writes a header.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import InvalidVolume

BINARY_HEADER_SIZE = 4096
MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
# Table 2: the allowed header sizes, which are also the secondary header's offsets.
HEADER_SIZES = tuple(16384 << n for n in range(9))          # 16 KiB .. 4 MiB
MAX_HEADER_SIZE = HEADER_SIZES[-1]
SECTIONS = ("keyslots", "tokens", "segments", "digests", "config")
MAX_ID = 31                                                    # LUKS2_TOKENS_MAX - 1
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
CSUM_OFFSET = 448
CSUM_SIZE = 64


@dataclass(frozen=True)
class BinaryHeader:
    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    uuid: str
    subsystem: str
    hdr_offset: int

    @property
    def primary(self) -> bool:
        return self.magic == MAGIC_PRIMARY


@dataclass(frozen=True)
class Luks2Header:
    """One verified header copy: its binary fields and its JSON metadata."""

    binary: BinaryHeader
    metadata: dict[str, Any]
    tokens: dict[int, dict[str, Any]] = field(default_factory=dict)
    keyslots: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        return self.binary.uuid

    @property
    def label(self) -> str:
        return self.binary.label


def is_luks(data: bytes) -> bool:
    return data[:6] in (MAGIC_PRIMARY, MAGIC_SECONDARY)


def luks_version(data: bytes) -> int | None:
    """The version field of a LUKS header of either generation, or None."""
    if len(data) < 8 or not is_luks(data):
        return None
    return struct.unpack_from(">H", data, 6)[0]


def parse_binary(data: bytes) -> BinaryHeader:
    """The 4096-byte binary header (not yet checksummed)."""
    if len(data) < BINARY_HEADER_SIZE:
        raise InvalidVolume(f"LUKS2 binary header truncated: {len(data)} of "
                            f"{BINARY_HEADER_SIZE} bytes")
    (magic, version, hdr_size, seqid, label, csum_alg, _salt, uuid, subsystem, hdr_offset,
     _pad, _csum) = _BINARY.unpack_from(data)
    if magic not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
        raise InvalidVolume("not a LUKS header (bad magic)")
    if version != 2:
        raise InvalidVolume(f"LUKS version {version}: only LUKS2 has tokens "
                            "(cryptsetup convert --type luks2)" if version == 1
                            else f"unknown LUKS version {version}")
    if hdr_size not in HEADER_SIZES:
        raise InvalidVolume(f"LUKS2 hdr_size {hdr_size} is not one the format allows")
    return BinaryHeader(magic=magic, version=version, hdr_size=hdr_size, seqid=seqid,
                        label=_text(label, "label"), checksum_alg=_text(csum_alg, "checksum_alg"),
                        uuid=_text(uuid, "uuid"), subsystem=_text(subsystem, "subsystem"),
                        hdr_offset=hdr_offset)


def parse_copy(area: bytes, offset: int) -> Luks2Header:
    """One header copy read from `offset` (`area` holds at least its hdr_size bytes):
    magic, version, offset, checksum and JSON all checked."""
    binary = parse_binary(area)
    if binary.hdr_offset != offset:
        raise InvalidVolume(f"LUKS2 header at offset {offset} says it is at {binary.hdr_offset}")
    if binary.primary != (offset == 0):
        raise InvalidVolume(f"LUKS2 {'primary' if binary.primary else 'secondary'} magic "
                            f"at offset {offset}")
    if len(area) < binary.hdr_size:
        raise InvalidVolume(f"LUKS2 header truncated: {len(area)} of {binary.hdr_size} bytes")
    whole = area[:binary.hdr_size]
    _verify_checksum(whole, binary.checksum_alg)
    metadata = _parse_json(whole[BINARY_HEADER_SIZE:])
    return Luks2Header(binary=binary, metadata=metadata,
                       tokens=_numbered(metadata, "tokens"),
                       keyslots=_numbered(metadata, "keyslots"))


def current(copies: list[Luks2Header]) -> Luks2Header:
    """The copy in force: the valid one with the highest seqid (§2.1)."""
    if not copies:
        raise InvalidVolume("no valid LUKS2 header copy")
    return max(copies, key=lambda c: (c.binary.seqid, c.binary.primary))


def _verify_checksum(whole: bytes, alg: str) -> None:
    try:
        h = hashlib.new(alg.lower())
    except ValueError:
        raise InvalidVolume(f"LUKS2 checksum algorithm {alg!r} unknown") from None
    if h.digest_size > CSUM_SIZE:
        raise InvalidVolume(f"LUKS2 checksum algorithm {alg!r} too wide")
    h.update(whole[:CSUM_OFFSET])
    h.update(bytes(CSUM_SIZE))
    h.update(whole[CSUM_OFFSET + CSUM_SIZE:])
    stored = whole[CSUM_OFFSET:CSUM_OFFSET + CSUM_SIZE]
    if stored[:h.digest_size] != h.digest() or any(stored[h.digest_size:]):
        raise InvalidVolume("LUKS2 header checksum does not match")


def _parse_json(area: bytes) -> dict[str, Any]:
    text = area.split(b"\0", 1)[0]
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidVolume(f"LUKS2 JSON area is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidVolume("LUKS2 JSON area is not an object")
    missing = [name for name in SECTIONS if not isinstance(doc.get(name), dict)]
    if missing:
        raise InvalidVolume(f"LUKS2 JSON lacks the object(s) {', '.join(missing)}")
    return doc


def _numbered(doc: dict[str, Any], section: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for key, value in doc[section].items():
        if not key.isdigit() or int(key) > MAX_ID or not isinstance(value, dict):
            raise InvalidVolume(f"LUKS2 {section} entry {key!r} is malformed")
        if not isinstance(value.get("type"), str):
            raise InvalidVolume(f"LUKS2 {section} entry {key} has no type")
        out[int(key)] = value
    return out


def token_keyslots(token: dict[str, Any], token_id: int) -> tuple[int, ...]:
    """A token's "keyslots": an array of decimal strings (§3.5)."""
    slots = token.get("keyslots")
    if not isinstance(slots, list) or not all(isinstance(s, str) and s.isdigit()
                                              for s in slots):
        raise InvalidVolume(f"LUKS2 token {token_id}: keyslots must be decimal strings")
    return tuple(int(s) for s in slots)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidVolume(f"LUKS2 {what} is not ASCII") from None
