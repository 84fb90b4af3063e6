"""UKI add-ons on disk (relaunchd.platform.addon_files): where systemd-stub looks (the
boot partition's loader/addons/, then <UKI>.extra.d/; uki.md §1.5), which entries it
tries and in what order, and each one read through a sealed copy under the image rules.
tests/integration/test_addons.py applies real, signed add-ons end to end."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.platform import addon_files, image_files, sealed_memfd
from relaunchd.platform.image_files import ImagePolicy
from support import ukibuild


def esp(tmp_path: Path) -> Path:
    root = tmp_path / "esp"
    (root / "EFI/Linux").mkdir(parents=True)
    (root / "loader/addons").mkdir(parents=True)
    for d in (root, root / "EFI", root / "EFI/Linux", root / "loader", root / "loader/addons"):
        os.chmod(d, 0o755)
    (root / "EFI/Linux/uki.efi").write_bytes(b"MZ")
    return root


def memfds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:relaunchd:addon"):
                out.append(fd)
        except OSError:
            pass
    return out


def opened(root: Path, path: Path) -> image_files.ImageFile:
    """The image as staging opens it: once, by descriptor, under the policy."""
    return image_files.open_allowed(str(path), ImagePolicy((str(root),)))


def listed(path: Path) -> image_files.ImageDirectory | None:
    return image_files.open_allowed_directory(str(path), ImagePolicy((str(path.parent),)))


def test_the_directories_in_the_stubs_order(tmp_path):
    root = esp(tmp_path)
    uki = root / "EFI/Linux/uki.efi"
    with opened(root, uki) as image:
        assert addon_files.directories(image, str(root)) == [
            ("global", str(root / "loader/addons")), ("per-UKI", f"{uki}.extra.d")]


def test_without_a_boot_partition_the_mount_point_holding_the_image(tmp_path):
    root = esp(tmp_path)
    uki = root / "EFI/Linux/uki.efi"
    # coreutils names the mount point of a file independently: stat --format=%m
    expected = subprocess.run(["stat", "--format=%m", str(uki)], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    found = addon_files.mount_point(str(uki))
    if expected != "/" and os.stat(expected).st_dev == os.stat(os.path.dirname(expected)).st_dev:
        # a bind mount of a directory of the same file system: no st_dev change marks it,
        # so the file system's root lies further up
        assert expected.startswith(found.rstrip("/") + "/")
    else:
        assert found == expected
    with opened(root, uki) as image:
        # Below the allowed directory (root here) the walk's own descriptors mark the
        # file system; from the allowed directory up, st_dev changes as for mount_point.
        assert addon_files.partition_root(image) == found
        assert addon_files.directories(image, None)[0] == (
            "global", os.path.join(found, "loader/addons"))


def test_which_entries_the_stub_tries_and_their_order(tmp_path):
    d = tmp_path / "addons"
    d.mkdir()
    for name in ("b.addon.efi", "A.ADDON.EFI", "a.addon.efi", ".hidden.addon.efi",
                 "x.efi", "x.addon.efi.bak", "caf\u00e9.addon.efi"):
        (d / name).write_bytes(b"MZ")
    (d / "dir.addon.efi").mkdir()
    with listed(d) as directory:
        names = addon_files.candidates(directory)
    # strcmp16 on ASCII: upper case before lower case
    assert names == ["A.ADDON.EFI", "a.addon.efi", "b.addon.efi"]
    assert listed(tmp_path / "missing") is None


def test_too_many_addons_are_refused(tmp_path):
    d = tmp_path / "addons"
    d.mkdir()
    for i in range(addon_files.MAX_ADDONS + 1):
        (d / f"{i:04d}.addon.efi").write_bytes(b"")
    with listed(d) as directory, \
            pytest.raises(InvalidImage, match=f"at most {addon_files.MAX_ADDONS}"):
        addon_files.candidates(directory)


@pytest.fixture(scope="module")
def addon_image(tmp_path_factory) -> bytes:
    return ukibuild.build_uki(ukibuild.UkiSpec([(".cmdline", b"addon=1")]),
                              tmp_path_factory.mktemp("addon") / "a.addon.efi").read_bytes()


def test_discover_copies_each_addon_into_a_sealed_memfd(tmp_path, addon_image):
    root = esp(tmp_path)
    (root / "loader/addons/g.addon.efi").write_bytes(addon_image)
    per = root / "EFI/Linux/uki.efi.extra.d"
    per.mkdir(mode=0o755)
    (per / "p.addon.efi").write_bytes(addon_image)
    with opened(root, root / "EFI/Linux/uki.efi") as image:
        found = addon_files.discover(image, ImagePolicy((str(root),)), str(root))
    try:
        assert [(os.path.basename(a.path), a.scope) for a in found] == [
            ("g.addon.efi", "global"), ("p.addon.efi", "per-UKI")]
        for addon in found:
            assert sealed_memfd.is_sealed(addon.fd)
            assert addon.loaded(".cmdline") == b"addon=1"
        (root / "loader/addons/g.addon.efi").write_bytes(b"changed")   # after the copy
        assert found[0].loaded(".cmdline") == b"addon=1"
    finally:
        for addon in found:
            addon.close()
    assert memfds() == []


@pytest.mark.parametrize("problem", ["not a PE", "writable directory", "symlink"])
def test_an_addon_that_cannot_be_read_safely_is_named_and_nothing_stays_open(
        tmp_path, addon_image, problem):
    root = esp(tmp_path)
    addons = root / "loader/addons"
    (addons / "a.addon.efi").write_bytes(addon_image)      # fine, found first
    bad = addons / "b.addon.efi"
    if problem == "not a PE":
        bad.write_bytes(b"not a PE file at all")
    elif problem == "writable directory":
        bad.write_bytes(addon_image)
        os.chmod(addons, 0o777)
    else:
        bad.symlink_to(addons / "a.addon.efi")
    with opened(root, root / "EFI/Linux/uki.efi") as image, \
            pytest.raises(InvalidImage, match="b.addon.efi" if problem != "writable directory"
                          else "writable by non-root"):
        addon_files.discover(image, ImagePolicy((str(root),)), str(root))
    assert memfds() == []
