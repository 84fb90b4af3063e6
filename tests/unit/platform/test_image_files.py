"""Image files on disk (relaunchd.platform.image_files): where an image may come from (an
allowed directory below which nothing is writable by non-root) and opening it safely
(regular files only, no symlink unless asked, never blocking on a FIFO or opening a device)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.platform.image_files import (
    DEFAULT_IMAGE_DIRS,
    ImagePolicy,
    check_location,
    open_image,
    open_regular,
)
from support import ukibuild

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.fixture
def boot(tmp_path) -> Path:
    """An allowed directory with one image two levels down, all root's, 0755/0644."""
    d = tmp_path / "boot"
    (d / "EFI/Linux").mkdir(parents=True)
    for sub in (d, d / "EFI", d / "EFI/Linux"):
        os.chmod(sub, 0o755)
    (d / "EFI/Linux/a.efi").write_bytes(b"MZ")
    os.chmod(d / "EFI/Linux/a.efi", 0o644)
    return d


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_default_directories_are_the_documented_ones():
    text = README.read_text()
    for directory in DEFAULT_IMAGE_DIRS:
        assert f"`{directory}`" in text, directory


def test_an_image_inside_an_allowed_directory(boot):
    image = boot / "EFI/Linux/a.efi"
    assert check_location(str(image), ImagePolicy((str(boot),))) == str(image)
    # through a symlinked allowed directory: the real path is what is checked and returned
    link = boot.parent / "esp"
    link.symlink_to(boot)
    assert check_location(str(link / "EFI/Linux/a.efi"), ImagePolicy((str(link),))) \
        == str(image)


@pytest.mark.parametrize("where", ["outside", "the directory itself", "sibling prefix"])
def test_not_inside(boot, where):
    path = {"outside": boot.parent / "a.efi", "the directory itself": boot,
            "sibling prefix": boot.parent / "boot2" / "a.efi"}[where]
    path.parent.mkdir(exist_ok=True)
    if where != "the directory itself":
        path.write_bytes(b"MZ")
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        check_location(str(path), ImagePolicy((str(boot),)))


def test_no_policy_names_that(boot):
    with pytest.raises(InvalidImage, match="none configured"):
        check_location(str(boot / "EFI/Linux/a.efi"), ImagePolicy(()))


@pytest.mark.parametrize("what", ["EFI", "EFI/Linux", "EFI/Linux/a.efi"])
@pytest.mark.parametrize("mode_bit", [stat.S_IWGRP, stat.S_IWOTH], ids=["group", "other"])
def test_anything_writable_by_non_root_below_the_directory_is_refused(boot, what, mode_bit):
    target = boot / what
    os.chmod(target, stat.S_IMODE(target.stat().st_mode) | mode_bit)
    with pytest.raises(InvalidImage, match=f"{target} is writable by non-root users"):
        check_location(str(boot / "EFI/Linux/a.efi"), ImagePolicy((str(boot),)))


def test_a_component_owned_by_another_user_is_refused(boot):
    os.chown(boot / "EFI", 65534, 65534)
    with pytest.raises(InvalidImage, match="owned by uid 65534"):
        check_location(str(boot / "EFI/Linux/a.efi"), ImagePolicy((str(boot),)))


def test_what_lies_above_the_allowed_directory_is_trusted_as_configured(boot):
    os.chmod(boot.parent, 0o777)                 # above the allowed directory: not checked
    assert check_location(str(boot / "EFI/Linux/a.efi"), ImagePolicy((str(boot),)))
    os.chmod(boot, 0o777)                        # the directory itself is
    with pytest.raises(InvalidImage, match=f"{boot} is writable by non-root users"):
        check_location(str(boot / "EFI/Linux/a.efi"), ImagePolicy((str(boot),)))


def test_symlinks_are_refused_unless_the_policy_follows_them(boot):
    link = boot / "EFI/Linux/link.efi"
    link.symlink_to("a.efi")
    with pytest.raises(InvalidImage, match="symbolic link"):
        check_location(str(link), ImagePolicy((str(boot),)))
    assert check_location(str(link), ImagePolicy((str(boot),), follow_symlinks=True)) \
        == str(boot / "EFI/Linux/a.efi")
    outside = boot.parent / "evil.efi"
    outside.write_bytes(b"MZ")
    (boot / "EFI/Linux/out.efi").symlink_to(outside)
    with pytest.raises(InvalidImage, match="not inside"):
        check_location(str(boot / "EFI/Linux/out.efi"),
                       ImagePolicy((str(boot),), follow_symlinks=True))


def test_a_missing_file_cannot_be_checked(boot):
    with pytest.raises(InvalidImage, match="cannot check"):
        check_location(str(boot / "EFI/Linux/gone.efi"), ImagePolicy((str(boot),)))


def test_open_regular_opens_regular_files_read_only(boot):
    fd = open_regular(str(boot / "EFI/Linux/a.efi"))
    try:
        assert os.read(fd, 10) == b"MZ"
        flags = os.get_blocking(fd), os.get_inheritable(fd)
        assert flags == (False, False)               # O_NONBLOCK, O_CLOEXEC
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_open_regular_refuses_everything_else_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.efi"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.efi"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (tmp_path / "target.efi").write_bytes(b"MZ")
    (tmp_path / "link.efi").symlink_to(tmp_path / "target.efi")
    try:
        before = open_fds()
        cases = {fifo: "is a FIFO", sock_path: "is a socket", tmp_path: "is a directory",
                 Path("/dev/null"): "is a character device",
                 tmp_path / "link.efi": "symbolic link", tmp_path / "gone.efi": "no such file"}
        for path, fragment in cases.items():
            with pytest.raises(InvalidImage, match=fragment) as info:
                open_regular(str(path))
            assert str(path) in str(info.value)
        assert open_fds() == before
    finally:
        sock.close()
    fd = open_regular(str(tmp_path / "link.efi"), follow_symlinks=True)
    os.close(fd)


def test_open_image_parses_and_closes_on_failure(tmp_path):
    uki = ukibuild.build_uki(ukibuild.UkiSpec([(".osrel", b"ID=x\n"),
                                               (".linux", b"MZ" + bytes(1000))]),
                             tmp_path / "x.efi")
    with open_image(str(uki)) as image:
        assert image.os_release(image.resolve(None)) == {"ID": "x"}
    (tmp_path / "bad.efi").write_bytes(b"MZ" + bytes(10))
    before = open_fds()
    with pytest.raises(InvalidImage, match="bad.efi"):
        open_image(str(tmp_path / "bad.efi"))
    assert open_fds() == before
