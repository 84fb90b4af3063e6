"""Image paths resolved once, by descriptor (issue 14, item 2), against fixture trees: the
image policy's walk (`image_files`), the walk itself (`path_walk`, with openat2 and with
its openat fallback), certificate files (`trust_store`) and `--output DIR` (`output_dir`).

The kernel is the oracle for the openat2 constants: RESOLVE_NO_SYMLINKS must make it refuse
a link (ELOOP) and RESOLVE_BENEATH a ".." out of the directory (EXDEV), as openat2(2) says.
Ownership cases chown to `nobody` (65534), so these tests need root."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.errors import InvalidArgument, InvalidImage
from relaunchd.platform import image_files, output_dir, path_walk, trust_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")

NOBODY = 65534
CONTENT = b"MZ not really a UKI, but a regular file with known bytes\n"


def open_fds() -> dict[str, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):     # the listing's own descriptor
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


@pytest.fixture(params=["openat2", "ENOSYS", "EPERM"])
def mode(request, monkeypatch) -> str:
    """Every walk test runs three times: with openat2; as on a kernel without it
    (ENOSYS); and as under a seccomp filter that refuses it (EPERM). Without it, each
    step falls back to openat with O_NOFOLLOW."""
    if request.param != "openat2":
        err = getattr(errno, request.param)

        def refused_syscall(dir_fd, name, flags, resolve, mode=0):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(path_walk, "openat2", refused_syscall)
    return request.param


@pytest.fixture
def tree(tmp_path) -> Path:
    """allowed/ (root, 0755) holding sub/x.efi; elsewhere/ holding y.efi."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for d in (tmp_path, allowed, allowed / "sub", tmp_path / "elsewhere"):
        os.chmod(d, 0o755)
    for f in (allowed / "sub" / "x.efi", tmp_path / "elsewhere" / "y.efi"):
        f.write_bytes(CONTENT)
        os.chmod(f, 0o644)
    return tmp_path


def policy(tree: Path, follow: bool = False) -> image_files.ImagePolicy:
    return image_files.ImagePolicy((str(tree / "allowed"),), follow_symlinks=follow)


def refused(path: Path | str, pol: image_files.ImagePolicy, fragment: str) -> str:
    """Both the opener and the cheap check refuse, with the same message, naming the
    request, leaving no descriptor open."""
    before = open_fds()
    with pytest.raises(InvalidImage) as opened:
        image_files.open_allowed(str(path), pol).close()
    with pytest.raises(InvalidImage) as checked:
        image_files.check_location(str(path), pol)
    assert open_fds() == before
    message = str(opened.value)
    assert fragment in message, message
    assert message.startswith(f"{path}: "), message
    assert str(checked.value) == message
    return message


# ---------------------------------------------------------------- the kernel as oracle


def test_openat2_constants_are_the_kernels(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "f")
    top = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        fd = path_walk.openat2(top, "../f", os.O_RDONLY | os.O_CLOEXEC, 0)
        os.close(fd)            # no RESOLVE_* flag: an ordinary openat
        with pytest.raises(OSError) as info:
            path_walk.openat2(top, "../f", os.O_RDONLY, path_walk.RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV
        with pytest.raises(OSError) as info:
            path_walk.openat2(top, "link", os.O_RDONLY, path_walk.RESOLVE_NO_SYMLINKS)
        assert info.value.errno == errno.ELOOP
        fd = path_walk.openat2(top, "link", os.O_RDONLY | os.O_CLOEXEC, 0)
        assert os.read(fd, 1) == b"x"
        os.close(fd)
    finally:
        os.close(top)


def test_each_step_refuses_a_link_swapped_in_after_the_check(tmp_path, mode, monkeypatch):
    """What the lstat of a step saw may be replaced before the step opens it: openat2's
    RESOLVE_NO_SYMLINKS, or O_NOFOLLOW in the fallback, refuses the link then."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "flink").symlink_to(tmp_path / "f")
    calls: list[str] = []
    real_openat2 = path_walk.openat2

    def counting(dir_fd, name, flags, resolve, mode=0):
        calls.append(name)
        return real_openat2(dir_fd, name, flags, resolve, mode)

    monkeypatch.setattr(path_walk, "openat2", counting)
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            path_walk.open_step(top, "link", path_walk.DIRECTORY_FLAGS)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        with pytest.raises(OSError) as info:
            path_walk.open_step(top, "flink", path_walk.READ_FLAGS)
        assert info.value.errno == errno.ELOOP
        os.close(path_walk.open_step(top, "real", path_walk.DIRECTORY_FLAGS))
        with pytest.raises(ValueError):
            path_walk.open_step(top, "real/..", path_walk.DIRECTORY_FLAGS)
    finally:
        os.close(top)
    assert calls == ["link", "flink", "real"]      # every mode tries openat2 first


# ---------------------------------------------------------------- the image policy


def test_allowed_image_is_opened_once_from_its_directory(tree, mode):
    image = tree / "allowed" / "sub" / "x.efi"
    with image_files.open_allowed(str(image), policy(tree)) as opened:
        assert os.pread(opened.fd, 100, 0) == CONTENT
        assert opened.path == opened.resolved == str(image)
        assert [s.path for s in opened.directories] == [str(tree / "allowed"),
                                                        str(tree / "allowed" / "sub")]
        st = os.fstat(opened.fd)
        assert (st.st_dev, st.st_ino) == (image.stat().st_dev, image.stat().st_ino)
        flags = os.get_blocking(opened.fd), fcntl_flags(opened.fd)
        assert flags[0] is False and flags[1] & os.O_ACCMODE == os.O_RDONLY
    assert image_files.check_location(str(image), policy(tree)) == str(image)


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_outside_and_dotdot_are_refused(tree, mode):
    refused(tree / "elsewhere" / "y.efi", policy(tree), "not inside an allowed image directory")
    refused(f"{tree}/allowed/sub/../../elsewhere/y.efi", policy(tree), "'..'")
    refused(tree / "allowed", policy(tree), "not inside an allowed image directory")
    refused("allowed/sub/x.efi", policy(tree), "not an absolute path")
    refused(tree / "allowed" / "sub" / "nope.efi", policy(tree), "does not exist")
    refused(tree / "allowed" / "nope" / "x.efi", policy(tree),
            f"{tree}/allowed/nope does not exist")


def test_user_owned_symlinked_directory_on_the_path_is_refused(tree, mode):
    """The issue's case without a race: a directory link a user owns, leading into the
    allowed directory. Named by the link, it is outside; placed inside, it is a link."""
    evil = tree / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    (evil / "d").symlink_to(tree / "allowed" / "sub")
    os.lchown(evil / "d", NOBODY, NOBODY)
    refused(evil / "d" / "x.efi", policy(tree), "not inside an allowed image directory")
    (tree / "allowed" / "d").symlink_to(evil / "d")
    os.lchown(tree / "allowed" / "d", NOBODY, NOBODY)
    message = refused(tree / "allowed" / "d" / "x.efi", policy(tree, follow=True),
                      "owned by uid 65534")
    assert f"{tree}/allowed/d is a symbolic link" in message
    refused(tree / "allowed" / "d" / "x.efi", policy(tree),
            f"{tree}/allowed/d is a symbolic link (refused)")


def test_symlinked_final_component_is_refused(tree, mode):
    link = tree / "allowed" / "sub" / "link.efi"
    link.symlink_to("x.efi")
    refused(link, policy(tree), "link.efi: is a symbolic link (refused)")


def test_follow_symlinks_follows_only_root_links_that_stay_beneath(tree, mode):
    sub = tree / "allowed" / "sub"
    (sub / "rel.efi").symlink_to("x.efi")
    (tree / "allowed" / "abs").symlink_to(sub)
    (sub / "up.efi").symlink_to("../../elsewhere/y.efi")
    (sub / "out.efi").symlink_to(tree / "elsewhere" / "y.efi")
    follow = policy(tree, follow=True)
    for path, resolved in ((sub / "rel.efi", sub / "x.efi"),
                           (tree / "allowed" / "abs" / "x.efi", sub / "x.efi")):
        with image_files.open_allowed(str(path), follow) as opened:
            assert os.pread(opened.fd, 100, 0) == CONTENT
            assert opened.path == str(path) and opened.resolved == str(resolved)
    refused(sub / "up.efi", follow, "would be left by '..'")
    refused(sub / "out.efi", follow, "not inside an allowed image directory")
    os.lchown(sub / "rel.efi", NOBODY, NOBODY)
    refused(sub / "rel.efi", follow, "symbolic link owned by uid 65534")


@pytest.mark.parametrize("where", ["allowed", "sub"])
def test_directories_must_be_root_owned_and_not_writable_by_others(tree, mode, where):
    directory = tree / "allowed" if where == "allowed" else tree / "allowed" / "sub"
    image = tree / "allowed" / "sub" / "x.efi"
    for bits, fragment in ((0o775, "is writable by non-root users"),
                           (0o757, "is writable by non-root users"),
                           (0o1777, "is writable by non-root users")):
        os.chmod(directory, bits)
        message = refused(image, policy(tree), fragment)
        assert f"{directory} {fragment}" in message
    os.chmod(directory, 0o755)
    os.chown(directory, NOBODY, 0)
    refused(image, policy(tree), f"{directory} is owned by uid 65534, not root")


def test_the_file_must_be_root_owned_and_not_writable_by_others(tree, mode):
    image = tree / "allowed" / "sub" / "x.efi"
    os.chmod(image, 0o664)
    refused(image, policy(tree), "x.efi: is writable by non-root users")
    os.chmod(image, 0o644)
    os.chown(image, NOBODY, NOBODY)
    refused(image, policy(tree), "x.efi: is owned by uid 65534, not root")


def test_fifo_device_socket_and_directory_are_refused_without_opening(tree, mode):
    sub = tree / "allowed" / "sub"
    os.mkfifo(sub / "fifo.efi", 0o644)
    os.mknod(sub / "null.efi", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sub / "sock.efi"))
        os.chmod(sub / "sock.efi", 0o644)
        refused(sub / "sock.efi", policy(tree), "is a socket, not a regular file")
    refused(sub / "fifo.efi", policy(tree), "is a FIFO, not a regular file")
    refused(sub / "null.efi", policy(tree), "is a character device, not a regular file")
    (sub / "dir.efi").mkdir(mode=0o755)
    refused(sub / "dir.efi", policy(tree), "is a directory, not a regular file")


def test_a_swap_after_the_check_is_caught_on_the_descriptor(tree, mode, monkeypatch):
    """The walk saw one file; if another is in its place when it is opened (only root
    could do that here), the descriptor's fstat says so and nothing is returned."""
    image = tree / "allowed" / "sub" / "x.efi"
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
        image_files.open_allowed(str(image), policy(tree))
    assert open_fds() == before


def test_allowed_directory_is_matched_as_configured_or_as_it_resolves(tree, mode):
    (tree / "alias").symlink_to(tree / "allowed")
    aliased = image_files.ImagePolicy((str(tree / "alias"),))
    for path in (tree / "alias" / "sub" / "x.efi", tree / "allowed" / "sub" / "x.efi"):
        with image_files.open_allowed(str(path), aliased) as opened:
            assert os.pread(opened.fd, 100, 0) == CONTENT


def test_inspect_opener_follows_only_trusted_links(tree, mode):
    """`open_regular` (inspect, verify): no policy, but a link a non-root user owns, or
    one in a directory such a user can change, is never followed."""
    evil = tree / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, NOBODY, NOBODY)
    (evil / "y.efi").symlink_to(tree / "elsewhere" / "y.efi")
    (tree / "root-link.efi").symlink_to(tree / "elsewhere" / "y.efi")
    fd = image_files.open_regular(str(tree / "root-link.efi"), follow_symlinks=True)
    assert os.pread(fd, 100, 0) == CONTENT
    os.close(fd)
    with pytest.raises(InvalidImage, match="root-link.efi: is a symbolic link"):
        image_files.open_regular(str(tree / "root-link.efi"))
    with pytest.raises(InvalidImage, match="in a directory non-root users can change"):
        image_files.open_regular(str(evil / "y.efi"), follow_symlinks=True)
    os.lchown(evil / "y.efi", NOBODY, NOBODY)
    with pytest.raises(InvalidImage, match="owned by uid 65534"):
        image_files.open_regular(str(evil / "y.efi"), follow_symlinks=True)


def test_the_report_opener_does_not_load_ctypes(tree):
    """`inspect` and `verify` walk with openat: importing ctypes for openat2 would add
    ~5 ms to every `relaunchctl inspect` (measured), a report that enforces no policy."""
    code = ("import os, sys\n"
            "from relaunchd.platform import image_files\n"
            f"os.close(image_files.open_regular({str(tree / 'elsewhere' / 'y.efi')!r}))\n"
            "print('ctypes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- certificate files


def test_certificate_files_need_a_path_only_root_controls(tree, keys, mode):
    cert = tree / "db.pem"
    cert.write_bytes(keys["db"].cert.read_bytes())
    os.chmod(cert, 0o644)
    assert trust_store.load_certificates([str(cert)])
    os.chmod(cert, 0o666)
    with pytest.raises(InvalidArgument, match="db.pem: is writable by non-root users"):
        trust_store.load_certificates([str(cert)])
    os.chmod(cert, 0o644)
    os.chown(cert, NOBODY, NOBODY)
    with pytest.raises(InvalidArgument, match="cannot read certificate .*owned by uid 65534"):
        trust_store.load_certificates([str(cert)])
    os.chown(cert, 0, 0)
    evil = tree / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, NOBODY, NOBODY)
    (evil / "db.pem").symlink_to(cert)
    with pytest.raises(InvalidArgument, match=f"{evil} is owned by uid 65534"):
        trust_store.load_certificates([str(evil / "db.pem")])
    # A root link in a root directory (as /etc/ssl/certs/*.pem) is followed.
    (tree / "link.pem").symlink_to(cert)
    assert trust_store.load_certificates([str(tree / "link.pem")])
    fifo = tree / "fifo.pem"
    os.mkfifo(fifo, 0o644)
    with pytest.raises(InvalidArgument, match="is a FIFO, not a regular file"):
        trust_store.load_certificates([str(fifo)])


# ---------------------------------------------------------------- --output DIR


def writers(**files: bytes) -> list[tuple[str, output_dir.Writer]]:
    return [(name, lambda fd, data=data: os.write(fd, data)) for name, data in files.items()]


def test_output_directory_is_made_private_or_must_be_the_callers(tmp_path, mode):
    fresh = tmp_path / "fresh"
    with output_dir.open_output_directory(str(fresh)) as out:
        assert out.write_all(writers(a=b"1", b=b"2")) == [str(fresh / "a"), str(fresh / "b")]
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 & ~current_umask()
    assert (fresh / "a").read_bytes() == b"1"
    for bits in (0o770, 0o707, 0o1777):
        os.chmod(fresh, bits)
        with pytest.raises(InvalidArgument, match="is writable by group or others"):
            output_dir.open_output_directory(str(fresh))
    os.chmod(fresh, 0o755)
    os.chown(fresh, NOBODY, NOBODY)
    with pytest.raises(InvalidArgument, match="owned by uid 65534, not by the caller"):
        output_dir.open_output_directory(str(fresh))
    with pytest.raises(InvalidArgument, match="does not exist"):
        output_dir.open_output_directory(str(tmp_path / "no" / "such"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_never_overwrites_and_leaves_nothing_on_failure(tmp_path, mode):
    out_dir = tmp_path / "out"
    out_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out_dir / "b").symlink_to(victim)
    with output_dir.open_output_directory(str(out_dir)) as out, \
            pytest.raises(InvalidArgument, match="out/b: already exists"):
        out.write_all(writers(a=b"1", b=b"2"))
    assert sorted(os.listdir(out_dir)) == ["b"] and victim.read_bytes() == b"precious"

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = tmp_path / "fresh"
    with output_dir.open_output_directory(str(fresh)) as out, \
            pytest.raises(InvalidArgument, match="cannot be written: No space left"):
        out.write_all([*writers(a=b"1"), ("b", fail)])
    assert not fresh.exists(), "a directory made for a failed write is removed again"
