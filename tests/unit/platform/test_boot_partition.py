"""platform.boot_partition on fixture machines: finding the ESP and XBOOTLDR like bootctl
(mountinfo, udev partition types, configured paths)."""

from __future__ import annotations

import os

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.platform import boot_partition
from relaunchd.platform.sysroot import SysRoot
from support.bootfixtures import tree


def mountinfo_line(root, point: str, fstype: str, mount_id: int) -> str:
    st = os.stat(root / point.lstrip("/"))
    return (f"{mount_id} 1 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / {point} rw - "
            f"{fstype} /dev/x rw\n")


def udev(root, point: str, scheme: str, kind: str) -> None:
    st = os.stat(root / point.lstrip("/"))
    tree(root, {f"/run/udev/data/b{os.major(st.st_dev)}:{os.minor(st.st_dev)}":
                f"S:disk/by-partlabel/x\nE:ID_PART_ENTRY_SCHEME={scheme}\n"
                f"E:ID_PART_ENTRY_TYPE={kind}\n"})


ENTRY = "title T\nsort-key t\nversion 1\nlinux /vmlinuz\n"


def test_esp_found_like_bootctl(tmp_path):
    tree(tmp_path, {"/boot/efi/loader/entries/a.conf": ENTRY, "/boot/efi/vmlinuz": "k",
                    "/efi/README": "not a mount point"})
    lines = [mountinfo_line(tmp_path, "/boot", "ext4", 30),
             mountinfo_line(tmp_path, "/boot/efi", "vfat", 31)]
    tree(tmp_path, {"/proc/self/mountinfo": "".join(lines)})
    # /efi is no mount point, /boot is not FAT: the ESP is /boot/efi (bootctl's order).
    found = boot_partition.find_partitions(SysRoot(str(tmp_path)))
    assert found.esp == boot_partition.Partition("esp", "/boot/efi",
                                                 "mount point (vfat, type unknown)")
    assert found.xbootldr is None


def test_partition_types_decide(tmp_path):
    tree(tmp_path, {"/efi/x": "", "/boot/x": ""})
    info = (mountinfo_line(tmp_path, "/efi", "vfat", 30)
            + mountinfo_line(tmp_path, "/boot", "ext4", 31))
    tree(tmp_path, {"/proc/self/mountinfo": info})
    root = SysRoot(str(tmp_path))
    # No udev data: a FAT root is taken as the ESP, nothing as XBOOTLDR.
    found = boot_partition.find_partitions(root)
    assert found.esp.path == "/efi" and found.xbootldr is None
    assert any("type unknown" in n for n in found.notes)
    # The fixture's /efi and /boot share one device: give it the ESP type, and /efi is
    # the ESP; give it a Linux type and /efi is not an ESP any more.
    udev(tmp_path, "/efi", "gpt", boot_partition.ESP_GPT_TYPE.upper())
    assert boot_partition.find_partitions(root).esp.found_by == "mount point (vfat, gpt ESP)"
    udev(tmp_path, "/efi", "gpt", "0fc63daf-8483-4772-8e79-3d69d8477de4")
    found = boot_partition.find_partitions(root)
    assert found.esp is None and found.xbootldr is None
    assert any("no ESP found" in n for n in found.notes)
    udev(tmp_path, "/boot", "gpt", boot_partition.XBOOTLDR_GPT_TYPE)
    found = boot_partition.find_partitions(root)
    assert found.esp is None
    assert found.xbootldr.path == "/boot" and "XBOOTLDR" in found.xbootldr.found_by


def test_not_a_mount_point_is_not_a_partition(tmp_path):
    tree(tmp_path, {"/efi/x": "", "/proc/self/mountinfo": "1 0 0:999 / /efi rw - vfat x rw\n"})
    assert boot_partition.find_partitions(SysRoot(str(tmp_path))).esp is None


def test_mountinfo_escapes():
    [m] = boot_partition.parse_mountinfo(
        "36 35 98:0 / /mnt\\040efi rw,noatime master:1 - vfat /dev/sda1 rw\n")
    assert (m.point, m.device, m.fstype) == ("/mnt efi", (98, 0), "vfat")
    assert boot_partition.parse_mountinfo("garbage\n1 2 x / /a - vfat\n") == []


def test_configured_paths(tmp_path):
    root = SysRoot(str(tmp_path))
    with pytest.raises(InvalidArgument):
        boot_partition.find_partitions(root, esp="/nope")
    with pytest.raises(InvalidArgument):
        boot_partition.find_partitions(root, esp="relative")
    (tmp_path / "esp").mkdir()
    found = boot_partition.find_partitions(root, esp="/esp", xbootldr="/esp")
    assert found.esp.found_by == "configured" and found.xbootldr is None


