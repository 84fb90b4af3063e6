"""launch.entry_staging on small trees: a Type #1 entry's initrds concatenated as `cat`
concatenates them (empty files skipped), its options as the command line, its kernel the
file itself, each in a sealed memfd; the refusals (unsigned parts, device trees, a custom
command line, a kernel that does not verify or is no bzImage) leave nothing open.
Debian's real signed kernel is tests/integration/test_stage_entries.py's."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from relaunchd.errors import (
    InvalidArgument,
    InvalidBootEntry,
    InvalidImage,
    VerificationFailed,
)
from relaunchd.launch import entry_staging, staging
from relaunchd.platform import boot_entries, image_files, sealed_memfd
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.trust_store import load_certificates
from support import ukibuild


def bzimage(cmdline_size: int = 2047) -> bytes:
    """A minimal bzImage (boot protocol 2.15; Documentation/arch/x86/boot.rst offsets):
    4 setup sectors, 4 KiB of protected-mode code, 64-bit and relocatable. No PE header,
    so no signature."""
    img = bytearray(5 * 512 + 0x1000)
    img[0x1F1] = 4                                            # setup_sects
    struct.pack_into("<I", img, 0x1F4, 0x100)                 # syssize (16-byte units)
    struct.pack_into("<H", img, 0x1FE, 0xAA55)                # boot_flag
    img[0x200:0x202] = b"\xeb\x6a"                            # jump past the header
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x020F)
    img[0x211] = 1                                            # LOADED_HIGH
    struct.pack_into("<IIBBHI", img, 0x22C, 0x7FFFFFFF, 0x200000, 1, 21, 0x7F,
                     cmdline_size)
    struct.pack_into("<QI", img, 0x258, 0x1000000, 0x10000)   # pref_address, init_size
    return bytes(img)


def entry(esp: Path, name: str, body: str) -> None:
    (esp / "loader" / "entries" / f"{name}.conf").write_text(body)


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    esp = root / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "k").mkdir()
    (esp / "k" / "vmlinuz").write_bytes(bzimage())
    (esp / "k" / "small").write_bytes(bzimage(cmdline_size=64))
    (esp / "k" / "a.img").write_bytes(os.urandom(1001))
    (esp / "k" / "empty.img").write_bytes(b"")
    (esp / "k" / "b.img").write_bytes(b"b" * 333)
    entry(esp, "two", "linux /k/vmlinuz\ninitrd /k/a.img\ninitrd /k/empty.img\n"
                      "initrd /k/b.img\noptions root=/dev/vda\noptions quiet\n")
    entry(esp, "bare", "linux /k/vmlinuz\n")
    entry(esp, "small", "linux /k/small\noptions " + "x" * 40 + "\n")
    (esp / "dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    entry(esp, "dt", "linux /k/vmlinuz\ndevicetree /dtb\n")
    return root


def listed(root: Path, name: str) -> boot_entries.ListedEntry:
    return boot_entries.find(boot_entries.list_entries(SysRoot(str(root)), esp="/efi",
                                                       machine="x64"), name)


def options(root: Path, **kw) -> staging.StageOptions:
    kw.setdefault("trusted", [])
    kw.setdefault("allow_unsigned", True)                   # no trust: testing only
    return staging.StageOptions(policy=image_files.ImagePolicy((str(root / "efi"),)),
                                root=SysRoot(str(root)), **kw)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 bzImage")
def test_type1_is_the_kernel_file_the_initrds_end_to_end_and_the_options(root, tmp_path):
    staged = entry_staging.prepare(listed(root, "two"), options(root, append=["rld=1"]),
                                   allow_unsigned_parts=True)
    try:
        assert all(sealed_memfd.is_sealed(p.fd) for p in (staged.kernel, staged.initrd))
        staging.write_artifacts(staged, str(tmp_path / "out"))
    finally:
        staged.close()
    out, k = tmp_path / "out", root / "efi" / "k"
    assert (out / "kernel").read_bytes() == (k / "vmlinuz").read_bytes()
    cat = subprocess.run(["cat", str(k / "a.img"), str(k / "empty.img"), str(k / "b.img")],
                         capture_output=True, check=True, timeout=30).stdout
    assert (out / "initrd").read_bytes() == cat
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cmdline"] == f"root=/dev/vda quiet rld=1 relaunchd.id={staged.id}"
    assert plan["initrd"]["parts"] == ["/efi/k/a.img", "/efi/k/b.img"]
    assert plan["notes"] == ["initrd /efi/k/empty.img is empty: skipped, as the boot loader "
                             "does"]
    assert plan["signature"]["signed"] is False and plan["entry"]["id"] == "two.conf"
    assert plan["source"] == "/efi/loader/entries/two.conf"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 bzImage")
def test_an_entry_without_initrd_or_options(root):
    staged = entry_staging.prepare(listed(root, "bare"), options(root),
                                   allow_unsigned_parts=False)   # nothing unsigned in it
    try:
        assert staged.initrd is None and staged.cmdline.text == f"relaunchd.id={staged.id}"
        assert staged.entry["unsigned"] == []
    finally:
        staged.close()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 bzImage")
def test_the_kernels_command_line_budget(root):
    with pytest.raises(InvalidArgument, match="takes at most 34"):
        entry_staging.prepare(listed(root, "small"), options(root), allow_unsigned_parts=True)


def test_refusals_leave_nothing_open(root, keys, tmp_path):
    before = open_fds()
    trusted = load_certificates([str(keys["db"].cert)])
    with pytest.raises(VerificationFailed, match="not a PE image"):
        entry_staging.prepare(listed(root, "two"), options(root, trusted=trusted,
                                                           allow_unsigned=False),
                              allow_unsigned_parts=True)
    with pytest.raises(VerificationFailed, match="no trusted certificates"):
        entry_staging.prepare(listed(root, "two"), options(root, allow_unsigned=False),
                              allow_unsigned_parts=True)
    with pytest.raises(VerificationFailed, match="trust.allow_unsigned_initrd"):
        entry_staging.prepare(listed(root, "two"), options(root), allow_unsigned_parts=False)
    with pytest.raises(InvalidBootEntry, match="device tree"):
        entry_staging.prepare(listed(root, "dt"), options(root), allow_unsigned_parts=True)
    with pytest.raises(InvalidBootEntry, match="custom command line"):
        entry_staging.prepare(listed(root, "two"), options(root, custom_cmdline="x"),
                              allow_unsigned_parts=True)
    # A signed PE that verifies but is no bzImage: verified first, then refused.
    pe_kernel = ukibuild.build_uki(ukibuild.UkiSpec([(".linux", b"MZ" + bytes(5000))]),
                                   tmp_path / "pe.efi")
    ukibuild.sign(pe_kernel, keys["db"], root / "efi" / "k" / "vmlinuz")
    if os.uname().machine == "x86_64":
        with pytest.raises(InvalidImage, match="not a usable x86 bzImage"):
            entry_staging.prepare(listed(root, "bare"), options(root, trusted=trusted,
                                                                allow_unsigned=False),
                                  allow_unsigned_parts=True)
    assert open_fds() == before


def test_uki_path_is_the_host_path_of_a_type2_entry(root):
    with pytest.raises(InvalidBootEntry, match="not a UKI"):
        entry_staging.uki_path(SysRoot(str(root)), listed(root, "two"))
