"""LUKS2 header copies laid out from the spec's table (LUKS2 On-Disk Format, Table 1/2),
not from relaunchd's formats.luks2: the unit tests of luks2, luks_tokens and luks_device
parse and read what this writes."""

from __future__ import annotations

import hashlib
import json
import struct

EMPTY = {"keyslots": {}, "tokens": {}, "segments": {}, "digests": {}, "config": {}}


def make_header(metadata: dict, *, offset: int = 0, size: int = 16384, seqid: int = 1,
                alg: str = "sha256") -> bytes:
    """A LUKS2 header copy laid out from the spec's table (not from luks2.py)."""
    magic = b"LUKS\xba\xbe" if offset == 0 else b"SKUL\xba\xbe"
    binary = bytearray(4096)
    binary[0:6] = magic
    struct.pack_into(">HQQ", binary, 6, 2, size, seqid)
    binary[24:24 + 5] = b"label"
    binary[72:72 + len(alg)] = alg.encode()
    binary[168:168 + 36] = b"12345678-1234-1234-1234-123456789abc"
    struct.pack_into(">Q", binary, 256, offset)
    area = bytes(binary) + json.dumps(metadata).encode().ljust(size - 4096, b"\0")
    digest = hashlib.new(alg, area).digest()          # csum field is still zero here
    return area[:448] + digest.ljust(64, b"\0") + area[512:]
