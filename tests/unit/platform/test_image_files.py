"""platform.image_files against fixture trees: the image policy resolved once, by
descriptor (issue 14, item 2: every case with openat2 and with its openat fallback), and
the policy and the open as callers see them (check_location, open_image, open_regular).
Ownership cases chown to `nobody` (65534), so these tests need root."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.errors import InvalidImage
from relaunchd.platform import image_files, path_walk
from relaunchd.platform.image_files import (
    DEFAULT_IMAGE_DIRS,
    ImagePolicy,
    check_location,
    open_image,
    open_regular,
)
from support import ukibuild
from support.path_cases import CONTENT, NOBODY, open_fds, policy, refused

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")

# ---------------------------------------------------------------- the image policy


def test_allowed_image_is_opened_once_from_its_directory(image_tree, mode):
    image = image_tree / "allowed" / "sub" / "x.efi"
    with image_files.open_allowed(str(image), policy(image_tree)) as opened:
        assert os.pread(opened.fd, 100, 0) == CONTENT
        assert opened.path == opened.resolved == str(image)
        assert [s.path for s in opened.directories] == [str(image_tree / "allowed"),
                                                        str(image_tree / "allowed" / "sub")]
        st = os.fstat(opened.fd)
        assert (st.st_dev, st.st_ino) == (image.stat().st_dev, image.stat().st_ino)
        flags = os.get_blocking(opened.fd), fcntl_flags(opened.fd)
        assert flags[0] is False and flags[1] & os.O_ACCMODE == os.O_RDONLY
    assert image_files.check_location(str(image), policy(image_tree)) == str(image)


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_outside_and_dotdot_are_refused(image_tree, mode):
    refused(image_tree / "elsewhere" / "y.efi", policy(image_tree),
            "not inside an allowed image directory")
    refused(f"{image_tree}/allowed/sub/../../elsewhere/y.efi", policy(image_tree), "'..'")
    refused(image_tree / "allowed", policy(image_tree), "not inside an allowed image directory")
    refused("allowed/sub/x.efi", policy(image_tree), "not an absolute path")
    refused(image_tree / "allowed" / "sub" / "nope.efi", policy(image_tree), "does not exist")
    refused(image_tree / "allowed" / "nope" / "x.efi", policy(image_tree),
            f"{image_tree}/allowed/nope does not exist")


def test_user_owned_symlinked_directory_on_the_path_is_refused(image_tree, mode):
    """The issue's case without a race: a directory link a user owns, leading into the
    allowed directory. Named by the link, it is outside; placed inside, it is a link."""
    evil = image_tree / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    (evil / "d").symlink_to(image_tree / "allowed" / "sub")
    os.lchown(evil / "d", NOBODY, NOBODY)
    refused(evil / "d" / "x.efi", policy(image_tree), "not inside an allowed image directory")
    (image_tree / "allowed" / "d").symlink_to(evil / "d")
    os.lchown(image_tree / "allowed" / "d", NOBODY, NOBODY)
    message = refused(image_tree / "allowed" / "d" / "x.efi", policy(image_tree, follow=True),
                      "owned by uid 65534")
    assert f"{image_tree}/allowed/d is a symbolic link" in message
    refused(image_tree / "allowed" / "d" / "x.efi", policy(image_tree),
            f"{image_tree}/allowed/d is a symbolic link (refused)")


def test_symlinked_final_component_is_refused(image_tree, mode):
    link = image_tree / "allowed" / "sub" / "link.efi"
    link.symlink_to("x.efi")
    refused(link, policy(image_tree), "link.efi: is a symbolic link (refused)")


def test_follow_symlinks_follows_only_root_links_that_stay_beneath(image_tree, mode):
    sub = image_tree / "allowed" / "sub"
    (sub / "rel.efi").symlink_to("x.efi")
    (image_tree / "allowed" / "abs").symlink_to(sub)
    (sub / "up.efi").symlink_to("../../elsewhere/y.efi")
    (sub / "out.efi").symlink_to(image_tree / "elsewhere" / "y.efi")
    follow = policy(image_tree, follow=True)
    for path, resolved in ((sub / "rel.efi", sub / "x.efi"),
                           (image_tree / "allowed" / "abs" / "x.efi", sub / "x.efi")):
        with image_files.open_allowed(str(path), follow) as opened:
            assert os.pread(opened.fd, 100, 0) == CONTENT
            assert opened.path == str(path) and opened.resolved == str(resolved)
    refused(sub / "up.efi", follow, "would be left by '..'")
    refused(sub / "out.efi", follow, "not inside an allowed image directory")
    os.lchown(sub / "rel.efi", NOBODY, NOBODY)
    refused(sub / "rel.efi", follow, "symbolic link owned by uid 65534")


@pytest.mark.parametrize("where", ["allowed", "sub"])
def test_directories_must_be_root_owned_and_not_writable_by_others(image_tree, mode, where):
    directory = image_tree / "allowed" if where == "allowed" else image_tree / "allowed" / "sub"
    image = image_tree / "allowed" / "sub" / "x.efi"
    for bits, fragment in ((0o775, "is writable by non-root users"),
                           (0o757, "is writable by non-root users"),
                           (0o1777, "is writable by non-root users")):
        os.chmod(directory, bits)
        message = refused(image, policy(image_tree), fragment)
        assert f"{directory} {fragment}" in message
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, 0)
    refused(image, policy(image_tree), f"{directory} is owned by uid 65534, not root")


def test_the_file_must_be_root_owned_and_not_writable_by_others(image_tree, mode):
    image = image_tree / "allowed" / "sub" / "x.efi"
    os.chmod(image, 0o664)
    refused(image, policy(image_tree), "x.efi: is writable by non-root users")
    os.chmod(image, 0o644)
    os.chown(image, NOBODY, NOBODY)
    refused(image, policy(image_tree), "x.efi: is owned by uid 65534, not root")


def test_fifo_device_socket_and_directory_are_refused_without_opening(image_tree, mode):
    sub = image_tree / "allowed" / "sub"
    os.mkfifo(sub / "fifo.efi", 0o644)
    os.mknod(sub / "null.efi", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sub / "sock.efi"))
        os.chmod(sub / "sock.efi", 0o644)
        refused(sub / "sock.efi", policy(image_tree), "is a socket, not a regular file")
    refused(sub / "fifo.efi", policy(image_tree), "is a FIFO, not a regular file")
    refused(sub / "null.efi", policy(image_tree), "is a character device, not a regular file")
    (sub / "dir.efi").mkdir(mode=0o755)
    refused(sub / "dir.efi", policy(image_tree), "is a directory, not a regular file")


def test_a_swap_after_the_check_is_caught_on_the_descriptor(image_tree, mode, monkeypatch):
    """The walk saw one file; if another is in its place when it is opened (only root
    could do that here), the descriptor's fstat says so and nothing is returned."""
    image = image_tree / "allowed" / "sub" / "x.efi"
    real_step = path_walk.open_step

    def swap_then_open(dir_fd, name, flags, *how):
        if name == "x.efi":
            other = image.with_name("other.efi")
            other.write_bytes(b"other")
            os.chmod(other, 0o644)
            os.replace(other, image)
        return real_step(dir_fd, name, flags, *how)

    monkeypatch.setattr(path_walk, "open_step", swap_then_open)
    before = open_fds()
    with pytest.raises(InvalidImage, match="was replaced while it was opened"):
        image_files.open_allowed(str(image), policy(image_tree))
    assert open_fds() == before


def test_allowed_directory_is_matched_as_configured_or_as_it_resolves(image_tree, mode):
    (image_tree / "alias").symlink_to(image_tree / "allowed")
    aliased = image_files.ImagePolicy((str(image_tree / "alias"),))
    for path in (image_tree / "alias" / "sub" / "x.efi", image_tree / "allowed" / "sub" / "x.efi"):
        with image_files.open_allowed(str(path), aliased) as opened:
            assert os.pread(opened.fd, 100, 0) == CONTENT


def test_inspect_opener_follows_only_trusted_links(image_tree, mode):
    """`open_regular` (inspect, verify): no policy, but a link a non-root user owns, or
    one in a directory such a user can change, is never followed."""
    evil = image_tree / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, NOBODY, NOBODY)
    (evil / "y.efi").symlink_to(image_tree / "elsewhere" / "y.efi")
    (image_tree / "root-link.efi").symlink_to(image_tree / "elsewhere" / "y.efi")
    fd = image_files.open_regular(str(image_tree / "root-link.efi"), follow_symlinks=True)
    assert os.pread(fd, 100, 0) == CONTENT
    os.close(fd)
    with pytest.raises(InvalidImage, match="root-link.efi: is a symbolic link"):
        image_files.open_regular(str(image_tree / "root-link.efi"))
    with pytest.raises(InvalidImage, match="in a directory non-root users can change"):
        image_files.open_regular(str(evil / "y.efi"), follow_symlinks=True)
    os.lchown(evil / "y.efi", NOBODY, NOBODY)
    with pytest.raises(InvalidImage, match="owned by uid 65534"):
        image_files.open_regular(str(evil / "y.efi"), follow_symlinks=True)


def test_the_report_opener_does_not_load_ctypes(image_tree):
    """`inspect` and `verify` walk with openat: importing ctypes for openat2 would add
    ~5 ms to every `relaunchctl inspect` (measured), a report that enforces no policy."""
    code = ("import os, sys\n"
            "from relaunchd.platform import image_files\n"
            f"os.close(image_files.open_regular({str(image_tree / 'elsewhere' / 'y.efi')!r}))\n"
            "print('ctypes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ the policy and the open,
# as callers see them (check_location, open_image, open_regular)

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


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_default_directories_are_the_documented_ones():
    text = README.read_text()
    for directory in DEFAULT_IMAGE_DIRS:
        assert f"`{directory}`" in text, directory


def test_an_image_inside_an_allowed_directory(boot):
    image = boot / "EFI/Linux/a.efi"
    assert check_location(str(image), ImagePolicy((str(boot),))) == str(image)
    # through a symlinked allowed directory (trusted as configured): the path as requested
    link = boot.parent / "esp"
    link.symlink_to(boot)
    assert check_location(str(link / "EFI/Linux/a.efi"), ImagePolicy((str(link),))) \
        == str(link / "EFI/Linux/a.efi")


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
    refusal = f"{re.escape(str(target))}:? is writable by non-root users"
    with pytest.raises(InvalidImage, match=refusal):
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
    with pytest.raises(InvalidImage, match="does not exist"):
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
        before = open_descriptors()
        cases = {fifo: "is a FIFO", sock_path: "is a socket", tmp_path: "is a directory",
                 Path("/dev/null"): "is a character device",
                 tmp_path / "link.efi": "symbolic link", tmp_path / "gone.efi": "no such file"}
        for path, fragment in cases.items():
            with pytest.raises(InvalidImage, match=fragment) as info:
                open_regular(str(path))
            assert str(path) in str(info.value)
        assert open_descriptors() == before
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
    before = open_descriptors()
    with pytest.raises(InvalidImage, match="bad.efi"):
        open_image(str(tmp_path / "bad.efi"))
    assert open_descriptors() == before
