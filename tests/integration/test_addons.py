"""Add-ons (uki.md §1.5): found where systemd-stub looks, applied in its order,
verified like the UKI, refused when they do not verify. Real add-on PE files are
built from Debian's stub with objcopy and signed with sbsign."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage, VerificationFailed
from relaunchd.formats import cmdline, cpio
from relaunchd.launch import staging
from relaunchd.platform import addon_files, image_files, sealed_memfd
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.trust_store import load_certificates
from support import ukibuild

UCODE = b"GenuineIntel.bin microcode stand-in\n" * 3


@pytest.fixture
def esp(tmp_path) -> Path:
    root = tmp_path / "esp"
    for d in ("EFI/Linux", "loader/addons"):
        (root / d).mkdir(parents=True)
    for d in (root, *root.rglob("*")):
        os.chmod(d, 0o755)
    return root


def addon(keys, out: Path, sections, key: str | None = "db") -> Path:
    """An add-on: the stub with these sections and no .linux, signed by `key`."""
    built = ukibuild.build_uki(ukibuild.UkiSpec(sections), out.with_suffix(".unsigned"))
    if key is None:
        shutil.move(built, out)
    else:
        ukibuild.sign(built, keys[key], out)
        built.unlink()
    os.chmod(out, 0o644)
    return out


def modern_uki(real_ukis, keys, esp: Path, stub_version: str = "257.9-1") -> Path:
    """The suite's `full` UKI claiming a newer stub, signed, at EFI/Linux/uki.efi."""
    target = esp / "EFI/Linux/uki.efi"
    source = real_ukis["modern"] if stub_version == "257.9-1" else None
    if source is None:
        data = bytearray(real_ukis["modern"].read_bytes())
        old = b"systemd-stub 257.9-1 ####"
        at = data.find(old)
        new = f"systemd-stub {stub_version} ####".encode().ljust(len(old), b"\0")
        data[at:at + len(old)] = new[:len(old)]
        source = esp.parent / "patched.efi"
        source.write_bytes(bytes(data))
    ukibuild.sign(source, keys["db"], target)
    os.chmod(target, 0o644)
    return target


def options(esp: Path, keys, **kw) -> staging.StageOptions:
    kw.setdefault("trusted", load_certificates([str(keys["db"].cert)]))
    platform = esp.parent / "platform"
    platform.mkdir(exist_ok=True)
    return staging.StageOptions(policy=image_files.ImagePolicy((str(esp),)),
                                boot_partition=str(esp),
                                root=SysRoot(str(platform)), **kw)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def extra_d(image: Path) -> Path:
    d = Path(str(image) + ".extra.d")
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    return d


def test_addons_are_applied_as_the_stub_applies_them(real_ukis, keys, esp, debian_kernel):
    image = modern_uki(real_ukis, keys, esp)
    per = extra_d(image)
    initrd_addon = ukibuild.newc_cpio({"etc/addon-marker": b"per-UKI add-on\n"})
    addon(keys, esp / "loader/addons/a.ADDON.EFI", [(".cmdline", b"  global=1\n")])
    addon(keys, esp / "loader/addons/b.addon.efi",
          [(".cmdline", b"mismatch=1"), (".uname", b"0.0.0-other")])
    addon(keys, esp / "loader/addons/c.addon.efi",
          [(".cmdline", b"uki=1"), (".linux", b"not a kernel")])
    addon(keys, esp / "loader/addons/d.addon.efi", [(".osrel", b"ID=nothing-useful\n")])
    addon(keys, per / "10-ucode.addon.efi", [(".ucode", UCODE)])
    addon(keys, per / "20-per.addon.efi",
          [(".cmdline", b"per=1"), (".initrd", initrd_addon),
           (".uname", debian_kernel.release.encode())])
    addon(keys, per / ".hidden.addon.efi", [(".cmdline", b"hidden=1")])
    (per / "readme.txt").write_text("not an add-on\n")
    (per / "dir.addon.efi").mkdir(mode=0o755)

    staged = staging.prepare(str(image), options(esp, keys))
    try:
        text = staged.cmdline.text
        assert text.startswith(
            "console=ttyS0 root=/dev/vda rw quiet relaunchd.test=full global=1 per=1 "
            "relaunchd.id=")
        for absent in ("mismatch=1", "uki=1", "hidden=1"):
            assert absent not in text
        # ucode add-ons first, the UKI's .initrd, the generated cpios, initrd add-ons last
        assert staged.initrd_parts[0] == "10-ucode.addon.efi:.ucode"
        assert staged.initrd_parts[1] == ".initrd"
        assert staged.initrd_parts[-1] == "20-per.addon.efi:.initrd"
        data = os.pread(staged.initrd.fd, staged.initrd.size, 0)
        assert data.startswith(UCODE + bytes(-len(UCODE) % 4))
        assert data.endswith(initrd_addon + bytes(-len(initrd_addon) % 4))
        members = {m.name for m in cpio.read_newc(data[len(UCODE) + (-len(UCODE) % 4):])}
        assert {"etc/relaunchd-marker", ".extra/os-release", "etc/addon-marker"} <= members
        assert staged.initrd.sha256 == hashlib.sha256(data).hexdigest()
        assert sealed_memfd.is_sealed(staged.initrd.fd)
        plan = staged.plan()
        assert [(Path(a["path"]).name, a["sections"], a["verified_by"])
                for a in plan["addons"]] == [
            ("a.ADDON.EFI", [".cmdline"], "CN=relaunchd test db"),
            ("10-ucode.addon.efi", [".ucode"], "CN=relaunchd test db"),
            ("20-per.addon.efi", [".cmdline", ".initrd"], "CN=relaunchd test db")]
        notes = " ".join(plan["notes"])
        assert "b.addon.efi ignored: .uname '0.0.0-other'" in notes
        assert "c.addon.efi ignored: it is a UKI" in notes
        assert "d.addon.efi ignored: none of" in notes
    finally:
        staged.close()


@pytest.mark.parametrize("signer,why", [(None, "not signed"), ("other", "")])
def test_an_addon_that_does_not_verify_is_refused(real_ukis, keys, esp, signer, why):
    image = modern_uki(real_ukis, keys, esp)
    bad = addon(keys, extra_d(image) / "bad.addon.efi", [(".cmdline", b"evil=1")], key=signer)
    before = open_fds()
    with pytest.raises(VerificationFailed, match=f"add-on {bad}: .*{why}.*refused"):
        staging.prepare(str(image), options(esp, keys))
    assert open_fds() == before


def test_an_unsigned_addon_is_taken_only_when_unsigned_images_are(real_ukis, keys, esp):
    image = modern_uki(real_ukis, keys, esp)
    addon(keys, extra_d(image) / "x.addon.efi", [(".cmdline", b"x=1")], key=None)
    staged = staging.prepare(str(image), options(esp, keys, trusted=[], allow_unsigned=True))
    try:
        assert " x=1 " in staged.cmdline.text
        assert staged.addons[0]["verified_by"] is None
        assert any("is not verified" in n for n in staged.notes)
    finally:
        staged.close()


def test_addon_location_rules_are_the_images(real_ukis, keys, esp):
    image = modern_uki(real_ukis, keys, esp)
    real = addon(keys, esp / "elsewhere.addon.efi", [(".cmdline", b"x=1")])
    (extra_d(image) / "link.addon.efi").symlink_to(real)
    with pytest.raises(InvalidImage, match="link.addon.efi: is a symbolic link"):
        staging.prepare(str(image), options(esp, keys))
    (extra_d(image) / "link.addon.efi").unlink()
    writable = addon(keys, extra_d(image) / "w.addon.efi", [(".cmdline", b"x=1")])
    os.chmod(writable, 0o666)
    with pytest.raises(InvalidImage, match="w.addon.efi: is writable by non-root"):
        staging.prepare(str(image), options(esp, keys))


def test_a_stub_older_than_addons_ignores_them(real_ukis, keys, esp):
    """Debian 12's stub (252) has no add-on support: firmware would boot without them."""
    image = esp / "EFI/Linux/uki.efi"
    shutil.copy(real_ukis["signed"], image)
    os.chmod(image, 0o644)
    addon(keys, extra_d(image) / "x.addon.efi", [(".cmdline", b"x=1")])
    staged = staging.prepare(str(image), options(esp, keys))
    try:
        assert "x=1" not in staged.cmdline.text and staged.addons == []
        assert any("systemd-stub 252 predates add-ons" in n for n in staged.notes)
    finally:
        staged.close()


def test_stub_256_applies_cmdline_addons_but_not_initrd_ones(real_ukis, keys, esp):
    image = modern_uki(real_ukis, keys, esp, stub_version="256.7-1")
    addon(keys, extra_d(image) / "x.addon.efi",
          [(".cmdline", b"x=1"), (".initrd", ukibuild.newc_cpio({"a": b"b"}))])
    staged = staging.prepare(str(image), options(esp, keys))
    try:
        assert " x=1 " in staged.cmdline.text
        assert not any("x.addon.efi" in p for p in staged.initrd_parts)
        assert any("its .initrd is not used" in n for n in staged.notes)
    finally:
        staged.close()


def test_cmdline_only_addons_keep_the_single_initrd_copy(real_ukis, keys, esp):
    """Only `.initrd`/`.ucode` add-ons change the initrd's shape; a command-line add-on
    leaves `.initrd` split off into the initrd memfd (the image copy has a hole)."""
    image = modern_uki(real_ukis, keys, esp)
    addon(keys, extra_d(image) / "x.addon.efi", [(".cmdline", b"x=1")])
    staged = staging.prepare(str(image), options(esp, keys))
    try:
        initrd_section = next(s for s in staged.report.sections if s.name == ".initrd")
        copy = os.pread(staged.image.fd, initrd_section.size, initrd_section.offset)
        assert copy == bytes(len(copy))
        assert " x=1 " in staged.cmdline.text
    finally:
        staged.close()


def test_no_addons_ignores_them(real_ukis, keys, esp):
    image = modern_uki(real_ukis, keys, esp)
    addon(keys, extra_d(image) / "x.addon.efi", [(".cmdline", b"x=1")], key=None)
    staged = staging.prepare(str(image), options(esp, keys, addons=False))
    try:
        assert "x=1" not in staged.cmdline.text and staged.addons == []
    finally:
        staged.close()


def test_cli_reports_addons(real_ukis, keys, esp, tmp_path, capsys):
    from relaunchd.cli import main

    image = modern_uki(real_ukis, keys, esp)
    addon(keys, extra_d(image) / "x.addon.efi", [(".cmdline", b"x=1")])
    args = ["stage", "--dry-run", "--image-dir", str(esp), "--boot-partition", str(esp),
            "--cert", str(keys["db"].cert), "--root", str(tmp_path), str(image)]
    assert main([*args[:1], "--json", *args[1:]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["addons"][0]["sections"] == [".cmdline"]
    assert main(args) == 0
    assert "add-on   " in capsys.readouterr().out
    assert main(["stage", "--no-addons", "--json", *args[1:]]) == 0
    assert json.loads(capsys.readouterr().out)["addons"] == []


def test_global_addons_default_to_the_image_mount_point(real_ukis, keys, esp):
    """Without --boot-partition, the global directory is at the top of the file system
    holding the file the image's walk ended at."""
    assert addon_files.mount_point("/proc/sys") == "/proc"
    image = modern_uki(real_ukis, keys, esp)
    policy = image_files.ImagePolicy((str(esp),))
    with image_files.open_allowed(str(image), policy) as opened:
        assert addon_files.directories(opened, None) == [
            ("global", os.path.join(addon_files.mount_point(str(esp)), "loader/addons")),
            ("per-UKI", f"{image}.extra.d")]
        assert addon_files.directories(opened, str(esp)) == [
            ("global", f"{esp}/loader/addons"), ("per-UKI", f"{image}.extra.d")]


def test_addon_cmdlines_join_as_the_stub_joins_them():
    assert cmdline.addon_tail([]) == ""
    assert cmdline.addon_tail([" a\n", "b\t"]) == "a b"
    assert cmdline.addon_tail(["", "b"]) == "b"
    assert cmdline.addon_tail(["a", "", "b"]) == "a  b"   # the stub's empty add-on space
    assert cmdline.compose("x", addons=["", ""]).text == "x"


def test_uname_is_compared_as_the_stub_compares_it():
    from relaunchd.formats.addons import uname_matches

    assert uname_matches("6.1.0-x", b"6.1.0-x\0\0\0")
    assert uname_matches("6.1.0-x-extra", b"6.1.0-x")      # strneq8 over the section's size
    assert not uname_matches("6.1.0-x", b"6.1.0-x-extra")
    assert not uname_matches("6.1.0-x", b"6.1.0-y\0")
    assert uname_matches("anything", b"")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "fifo"])
def test_a_malformed_addon_is_a_named_error_that_leaves_nothing(real_ukis, keys, esp, kind):
    image = modern_uki(real_ukis, keys, esp)
    target = extra_d(image) / "bad.addon.efi"
    if kind == "fifo":
        os.mkfifo(target, 0o644)
        why = "is a FIFO"
    else:
        good = addon(keys, esp.parent / "good.addon.efi", [(".cmdline", b"x=1")])
        target.write_bytes(good.read_bytes()[:300] if kind == "truncated"
                           else b"MZ" + os.urandom(4000))
        os.chmod(target, 0o644)
        why = "add-on .*bad.addon.efi: "
    before = open_fds()
    with pytest.raises(InvalidImage, match=why):
        staging.prepare(str(image), options(esp, keys))
    assert open_fds() == before
