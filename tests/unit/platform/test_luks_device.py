"""A volume's LUKS2 header read from its device below a root prefix: device links kept
inside the root (relative, absolute, climbing, the host's own path, loops), the primary
copy or, when it is broken, the secondary; what is not a block device or a regular file
refused. Headers written by cryptsetup on real image files: tests/integration/
test_sealed_volumes.py."""

from __future__ import annotations

import os

import pytest

from relaunchd.errors import InvalidVolume
from relaunchd.platform import luks_device
from support.luks2_header import EMPTY, make_header


def test_device_links_stay_inside_the_root(tmp_path):
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
        fd, resolved = luks_device.open_device(str(root), f"/dev/disk/by-uuid/{name}")
        try:
            assert os.read(fd, 16) == b"inside" and resolved == "/dev/vdb"
        finally:
            os.close(fd)
    for name in ("up", "host"):
        with pytest.raises(luks_device.DeviceNotOpened, match="does not exist"):
            luks_device.open_device(str(root), f"/dev/disk/by-uuid/{name}")
    with pytest.raises(luks_device.DeviceNotOpened, match="more than 40 symbolic links"):
        luks_device.open_device(str(root), "/dev/disk/by-uuid/loop")
    with pytest.raises(luks_device.DeviceNotOpened, match="not an absolute path"):
        luks_device.open_device(str(root), "dev/vdb")


def test_a_link_someone_else_could_have_planted_is_not_followed(tmp_path):
    root = tmp_path / "root"
    (root / "dev" / "open").mkdir(parents=True)
    (root / "dev" / "vdb").write_bytes(b"inside")
    (root / "dev" / "open").chmod(0o777)
    (root / "dev" / "open" / "link").symlink_to("../vdb")
    with pytest.raises(luks_device.DeviceNotOpened, match="can change"):
        luks_device.open_device(str(root), "/dev/open/link")


def test_the_primary_header_and_the_resolved_node(tmp_path):
    (tmp_path / "dev" / "disk" / "by-label").mkdir(parents=True)
    image = make_header({**EMPTY, "tokens": {"0": {"type": "other", "keyslots": []}}},
                        seqid=3)
    image += make_header(EMPTY, offset=16384, seqid=2)
    (tmp_path / "dev" / "vdc").write_bytes(image)
    (tmp_path / "dev" / "disk" / "by-label" / "data").symlink_to("../../vdc")
    header, node = luks_device.read_header(str(tmp_path), "/dev/disk/by-label/data")
    assert node == "/dev/vdc" and header.binary.seqid == 3 and 0 in header.tokens


def test_a_broken_primary_falls_back_to_the_secondary(tmp_path):
    (tmp_path / "dev").mkdir()
    primary = bytearray(make_header(EMPTY, seqid=3))
    primary[5000] ^= 0xFF                                     # checksum no longer holds
    image = bytes(primary) + make_header(EMPTY, offset=16384, seqid=2)
    (tmp_path / "dev" / "vdc").write_bytes(image)
    header, _ = luks_device.read_header(str(tmp_path), "/dev/vdc")
    assert header.binary.seqid == 2


@pytest.mark.parametrize("content, match", [
    (b"\0" * 8192, "no LUKS header"),
    (b"LUKS\xba\xbe\x00\x01" + bytes(8184), "LUKS1, not LUKS2"),
])
def test_not_luks2_is_named(tmp_path, content, match):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vdc").write_bytes(content)
    with pytest.raises(InvalidVolume, match=match):
        luks_device.read_header(str(tmp_path), "/dev/vdc")


def test_a_directory_or_fifo_is_not_a_block_device(tmp_path):
    (tmp_path / "dev" / "vdc").mkdir(parents=True)
    os.mkfifo(tmp_path / "dev" / "fifo")
    for node in ("/dev/vdc", "/dev/fifo"):
        with pytest.raises(InvalidVolume, match="is not a block device"):
            luks_device.read_header(str(tmp_path), node)
