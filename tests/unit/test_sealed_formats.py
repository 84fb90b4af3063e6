"""Sealed-volume formats on bad and edge input: crypttab(5) lines, LUKS2 headers that are
truncated, mis-checksummed or malformed, tokens with wrong field types, policy
arguments out of range, and paths that try to leave the root. Each is a named error
(InvalidVolume / InvalidArgument), never a traceback. The real formats are checked
against cryptsetup, systemd-cryptenroll and tpm2-tools in
tests/integration/test_sealed_volumes.py."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from relaunchd.errors import InvalidArgument, InvalidVolume
from relaunchd.formats import crypttab, luks2, luks_tokens, tpm_policy
from relaunchd.platform.beneath import open_beneath


def test_crypttab_fields_options_and_device_specs():
    entries = crypttab.parse(
        "# comment\n\n"
        "data  UUID=ABCD-1234  none  luks,tpm2-device=auto,x-initrd.attach\n"
        "swap /dev/sdb2 /dev/urandom swap,cipher=aes-xts-plain64\n"
        "home PARTLABEL=home\n"
        "\tlogs LABEL=logs - tpm2-pcrs=7+8,tpm2-pcrs=7\n")
    assert [e.name for e in entries] == ["data", "swap", "home", "logs"]
    data, swap, home, logs = entries
    assert data.device_node == "/dev/disk/by-uuid/ABCD-1234" and data.key_file is None
    assert data.in_initrd and data.option("tpm2-device") == "auto" and data.option("luks")
    assert swap.key_file == "/dev/urandom" and swap.device_node == "/dev/sdb2"
    assert home.options == () and home.device_node == "/dev/disk/by-partlabel/home"
    assert logs.key_file is None and logs.option("tpm2-pcrs") == "7"   # the last one wins
    assert logs.line == 6 and not logs.in_initrd
    assert crypttab.device_node('LABEL="my disk/1"') == "/dev/disk/by-label/my\\x20disk\\x2f1"


@pytest.mark.parametrize("text, match", [
    ("justone\n", "1 fields"),
    ("a b c d e\n", "5 fields"),
    ("../x /dev/sda\n", "bad volume name"),
])
def test_crypttab_bad_lines(text, match):
    with pytest.raises(InvalidVolume, match=match):
        crypttab.parse(text)


@pytest.mark.parametrize("spec", ["UUID=", "UUID=\"\"", "relative/path", "LABEL=.."])
def test_crypttab_bad_devices(spec):
    with pytest.raises(InvalidVolume):
        crypttab.device_node(spec)


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


EMPTY = {"keyslots": {}, "tokens": {}, "segments": {}, "digests": {}, "config": {}}


def test_luks2_header_laid_out_by_the_spec_parses():
    header = luks2.parse_copy(make_header({**EMPTY, "tokens": {
        "3": {"type": "other", "keyslots": ["0"]}}}), 0)
    assert header.uuid == "12345678-1234-1234-1234-123456789abc" and header.label == "label"
    assert header.tokens == {3: {"type": "other", "keyslots": ["0"]}}
    assert luks_tokens.tpm_sealings(header) == []


def test_higher_seqid_wins():
    primary = luks2.parse_copy(make_header(EMPTY, seqid=4), 0)
    secondary = luks2.parse_copy(make_header(EMPTY, offset=16384, seqid=5), 16384)
    assert luks2.current([primary, secondary]) is secondary


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h[:100], "truncated"),
    (lambda h: b"LUKZ" + h[4:], "bad magic"),
    (lambda h: h[:6] + b"\x00\x01" + h[8:], "LUKS version 1"),
    (lambda h: h[:8] + struct.pack(">Q", 12345) + h[16:], "hdr_size 12345"),
    (lambda h: h[:5000] + b"X" + h[5001:], "checksum"),
    (lambda h: h[:256] + struct.pack(">Q", 4096) + h[264:], "says it is at 4096"),
])
def test_luks2_bad_headers(mutate, match):
    with pytest.raises(InvalidVolume, match=match):
        luks2.parse_copy(mutate(make_header(EMPTY)), 0)


@pytest.mark.parametrize("metadata, match", [
    ({"keyslots": {}}, "lacks the object"),
    ({**EMPTY, "tokens": {"x": {"type": "a"}}}, "malformed"),
    ({**EMPTY, "tokens": {"40": {"type": "a"}}}, "malformed"),
    ({**EMPTY, "tokens": {"1": {"keyslots": []}}}, "no type"),
])
def test_luks2_bad_json(metadata, match):
    with pytest.raises(InvalidVolume, match=match):
        luks2.parse_copy(make_header(metadata), 0)


def test_luks2_json_that_is_not_json():
    raw = bytearray(make_header(EMPTY))
    raw[4096:4100] = b"{{{{"
    area = bytes(raw[:448]) + bytes(64) + bytes(raw[512:])
    fixed = area[:448] + hashlib.sha256(area).digest().ljust(64, b"\0") + area[512:]
    with pytest.raises(InvalidVolume, match="not valid JSON"):
        luks2.parse_copy(fixed, 0)


TOKEN = {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7],
         "tpm2-pcr-bank": "sha256", "tpm2-policy-hash": "00" * 32, "tpm2-pin": False,
         # TPM2B_PRIVATE (empty) || TPM2B_PUBLIC: type, nameAlg, attrs, authPolicy.
         "tpm2-blob": "AAAAKgAIAAsAAAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="}


def test_systemd_token_fields():
    sealing = luks_tokens.systemd_token(0, TOKEN)
    assert (sealing.pcrs, sealing.bank, sealing.keyslots, sealing.pin) == ((7,), "sha256",
                                                                           (1,), False)


@pytest.mark.parametrize("change, match", [
    ({"tpm2-pcrs": [24]}, "not a PCR number"),
    ({"tpm2-pcrs": [True]}, "not a PCR number"),
    ({"tpm2-pcrs": "7"}, "not a list"),
    ({"tpm2-pcr-bank": "md5"}, "unknown"),
    ({"tpm2-policy-hash": "zz"}, "not hex"),
    ({"tpm2-policy-hash": "11" * 32}, "not the sealed object's policy"),
    ({"tpm2-pin": "yes"}, "not a boolean"),
    ({"tpm2_pubkey_pcrs": [11]}, "without tpm2_pubkey"),
    ({"tpm2-blob": "AA=="}, "truncated"),
    ({"tpm2-blob": "***"}, "not base64"),
    ({"keyslots": [1]}, "decimal strings"),
])
def test_systemd_token_bad_fields(change, match):
    with pytest.raises(InvalidVolume, match=match):
        luks_tokens.systemd_token(0, {**TOKEN, **change})


@pytest.mark.parametrize("call", [
    lambda: tpm_policy.PcrSelection("sha256", (24,)),
    lambda: tpm_policy.PcrSelection("sha256", (7, 7)),
    lambda: tpm_policy.PcrSelection("md5", (7,)),
    lambda: tpm_policy.policy_pcr(bytes(31), [tpm_policy.PcrSelection("sha256", (7,))],
                                  {"sha256": {7: bytes(32)}}),
    lambda: tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7,))],
                                  {"sha256": {7: bytes(20)}}),
    lambda: tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7,))], {}),
    lambda: tpm_policy.extend("sha1", bytes(32), bytes(32)),
    lambda: tpm_policy.rsa_signing_key_name(b"", 65537),
])
def test_policy_arguments_out_of_range(call):
    with pytest.raises(InvalidArgument):
        call()


def test_policy_pcr_selection_is_ordered_by_the_bitmap():
    values = {"sha256": {0: bytes(32), 7: b"\x07" * 32}}
    a = tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7, 0))], values)
    b = tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (0, 7))], values)
    assert a == b


def test_open_beneath_keeps_links_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "dev" / "disk" / "by-uuid").mkdir(parents=True)
    (root / "dev" / "vdb").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside")
    links = root / "dev" / "disk" / "by-uuid"
    (links / "rel").symlink_to("../../vdb")
    (links / "abs").symlink_to("/dev/vdb")                  # absolute: from the root
    (links / "up").symlink_to("../../../../../../../../outside")  # clamped at the root
    (links / "host").symlink_to(str(outside))                # the host path, read in root
    (links / "loop").symlink_to("loop")
    for name in ("rel", "abs"):
        fd, resolved = open_beneath(str(root), f"/dev/disk/by-uuid/{name}")
        try:
            assert os.read(fd, 16) == b"inside" and resolved == "/dev/vdb"
        finally:
            os.close(fd)
    for name in ("up", "host"):
        with pytest.raises(FileNotFoundError):
            open_beneath(str(root), f"/dev/disk/by-uuid/{name}")
    with pytest.raises(OSError, match="too many symbolic links"):
        open_beneath(str(root), "/dev/disk/by-uuid/loop")
