"""Issue 14, items 1 and 2, played as the attacker: a local account (`nobody`) plants
links in `--output DIR` and races a symlinked directory against root's staging, through
`relaunchctl stage --dry-run` and through D-Bus (the real engine on a private bus,
`daemon_under_test.py fake-machine`). Before the fix, root wrote through the planted link
and staged the attacker's (trusted-signed) image under the allowed path's name.

Every process started here is bounded in time and stopped by the test that started it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relaunchd.errors import InvalidImage
from relaunchd.launch import staging
from relaunchd.platform import image_files
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.trust_store import load_certificates
from support import ukibuild
from support.dbus_harness import VENV_BIN, Daemon, PrivateBus

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runuser -u nobody)")

NOBODY = 65534
RACE_ATTEMPTS = 40
RACE_SECONDS = 40           # an upper bound for each race; new code needs far less
EVIL_CMDLINE = b"console=ttyS0 init=/bin/sh"

FLIPPER = """
import os, sys, time
link, first, second, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
spare = link + ".new"
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for target in (first, second):
        try:
            os.unlink(spare)
        except FileNotFoundError:
            pass
        os.symlink(target, spare)
        os.rename(spare, link)          # atomic: the link always names one of the two
"""


def as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True,
                          text=True, timeout=timeout, check=True)


@contextlib.contextmanager
def nobody_dir() -> Iterator[Path]:
    """A directory in /tmp that `nobody` owns (as an attacker's own /tmp/x would be)."""
    path = Path(tempfile.mkdtemp(prefix="relaunchd-evil-", dir="/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def flipping(link: Path, first: Path, second: Path) -> Iterator[None]:
    """`nobody` swaps `link` between two targets as fast as it can, until stopped."""
    proc = subprocess.Popen(
        ["timeout", str(RACE_SECONDS + 30), "runuser", "-u", "nobody", "--",
         "/usr/bin/python3", "-c", FLIPPER, str(link), str(first), str(second),
         str(RACE_SECONDS + 20)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.islink(link):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the flipper never started"
            time.sleep(0.01)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="module")
def evil_uki(tmp_path_factory, debian_kernel, keys) -> Path:
    """Another image, signed by the trusted key: an old kernel with init=/bin/sh."""
    d = tmp_path_factory.mktemp("evil")
    built = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b'ID=debian\nPRETTY_NAME="not the image you asked for"\n'),
        (".cmdline", EVIL_CMDLINE), (".linux", debian_kernel.vmlinuz)]), d / "evil.unsigned")
    return ukibuild.sign(built, keys["db"], d / "evil.efi")


@pytest.fixture
def images(tmp_path, real_ukis) -> Path:
    d = tmp_path / "images"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    shutil.copy(real_ukis["signed"], d / "signed.efi")
    os.chmod(d / "signed.efi", 0o644)
    return d


@pytest.fixture
def attacker(evil_uki) -> Iterator[Path]:
    """nobody's /tmp directory, holding own/signed.efi: the trusted-signed other image."""
    with nobody_dir() as base:
        own = base / "own"
        own.mkdir(mode=0o755)
        shutil.copy(evil_uki, own / "signed.efi")
        for p in (own, own / "signed.efi"):
            os.chown(p, NOBODY, NOBODY)
        os.chmod(own / "signed.efi", 0o644)
        yield base


def expected_plan(images: Path, keys) -> dict:
    """What staging the allowed image gives: the values every stage must match."""
    root = images.parent / "platform"
    root.mkdir(exist_ok=True)
    options = staging.StageOptions(trusted=load_certificates([str(keys["db"].cert)]),
                                   policy=image_files.ImagePolicy((str(images),)),
                                   root=SysRoot(str(root)))
    staged = staging.prepare(str(images / "signed.efi"), options)
    try:
        return staged.plan()
    finally:
        staged.close()


def without_id(cmdline: str) -> str:
    return " ".join(a for a in cmdline.split() if not a.startswith("relaunchd.id="))


def stage_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "relaunchctl"), "stage", "--dry-run", *args],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- item 1: --output DIR


def test_output_dir_with_a_planted_link_is_refused_and_nothing_is_written(
        images, keys, tmp_path):
    """The issue's reproduction: nobody makes /tmp/DIR and links DIR/cmdline to a
    root-only file; root's dry run must not write through it (it used to overwrite
    the file with the command line)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    os.chmod(secret, 0o600)
    before = secret.stat()
    plan_dir = Path(f"/tmp/relaunchd-plan-{os.getpid()}-{time.monotonic_ns()}")
    as_nobody("/bin/sh", "-c", 'mkdir -m 755 "$1" && ln -s "$2" "$1/cmdline"', "sh",
              str(plan_dir), str(secret))
    try:
        r = stage_cli("--output", str(plan_dir), "--image-dir", str(images),
                      "--cert", str(keys["db"].cert), str(images / "signed.efi"))
        assert r.returncode == 2, r.stderr
        assert "InvalidArgument: --output" in r.stderr and "owned by uid 65534" in r.stderr
        assert "Traceback" not in r.stderr
        assert secret.read_bytes() == b"root only\n"
        after = secret.stat()
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
        assert os.listdir(plan_dir) == ["cmdline"] and (plan_dir / "cmdline").is_symlink()
    finally:
        shutil.rmtree(plan_dir, ignore_errors=True)


def test_output_dir_that_is_a_users_link_is_refused(images, keys, tmp_path):
    """nobody makes /tmp/DIR a link to a root directory: root must not write there."""
    target = tmp_path / "root-dir"
    target.mkdir(mode=0o700)
    plan_dir = Path(f"/tmp/relaunchd-plan-{os.getpid()}-{time.monotonic_ns()}")
    as_nobody("ln", "-s", str(target), str(plan_dir))
    try:
        r = stage_cli("--output", str(plan_dir), "--image-dir", str(images),
                      "--cert", str(keys["db"].cert), str(images / "signed.efi"))
        assert r.returncode == 2, r.stderr
        assert "is a symbolic link owned by uid 65534" in r.stderr
        assert os.listdir(target) == []
    finally:
        plan_dir.unlink()


def test_output_dir_is_made_private_and_never_overwritten(images, keys, tmp_path):
    out = tmp_path / "plan"
    args = ("--json", "--output", str(out), "--image-dir", str(images), "--cert",
            str(keys["db"].cert), str(images / "signed.efi"))
    r = stage_cli(*args)
    assert r.returncode == 0, r.stderr
    written = {Path(p).name for p in json.loads(r.stdout)["written"]}
    assert written == {"kernel", "initrd", "cmdline", "plan.json"} == set(os.listdir(out))
    assert out.stat().st_mode & 0o777 == 0o700
    snapshot = {name: (out / name).read_bytes() for name in written}
    r = stage_cli(*args)
    assert r.returncode == 2 and "already exists (not overwritten" in r.stderr
    assert {name: (out / name).read_bytes() for name in written} == snapshot


# ---------------------------------------------------------------- item 2: image paths


def test_image_through_a_users_symlinked_directory_is_refused(images, keys, attacker):
    link = attacker / "d"
    os.symlink(images, link)
    os.lchown(link, NOBODY, NOBODY)
    r = stage_cli("--image-dir", str(images), "--cert", str(keys["db"].cert),
                  str(link / "signed.efi"))
    assert r.returncode == 2, r.stderr
    assert "InvalidImage" in r.stderr and "not inside an allowed image directory" in r.stderr
    r = stage_cli("--image-dir", str(images), "--cert", str(keys["db"].cert),
                  "--follow-symlinks", str(link / "signed.efi"))
    assert r.returncode == 2 and "not inside an allowed image directory" in r.stderr


def test_race_through_the_cli_never_stages_the_other_image(images, keys, attacker, capsys):
    """nobody flips its directory link between the allowed directory and its own while
    root runs `relaunchctl stage --dry-run` (its code, in this process: 40 interpreter
    starts would take longer than the race needs) on the path through the link, and on
    the allowed path itself. Each stage matches the allowed image or is refused."""
    from relaunchd.cli import main

    want = expected_plan(images, keys)
    link = attacker / "d"
    common = ["stage", "--dry-run", "--json", "--image-dir", str(images),
              "--cert", str(keys["db"].cert)]
    outcomes = {"refused": 0, "allowed image": 0}
    deadline = time.monotonic() + RACE_SECONDS
    with flipping(link, images, attacker / "own"):
        for attempt in range(RACE_ATTEMPTS):
            assert time.monotonic() < deadline, f"race too slow ({attempt} attempts)"
            for path in (link / "signed.efi", images / "signed.efi"):
                rc = main([*common, str(path)])
                out, err = capsys.readouterr()
                if rc != 0:
                    assert rc == 2 and "InvalidImage" in err, err
                    assert path != images / "signed.efi", err
                    outcomes["refused"] += 1
                    continue
                plan = json.loads(out)
                assert plan["pcr11"] == want["pcr11"], f"staged another image: {plan}"
                assert plan["initrd"] == want["initrd"]
                assert without_id(plan["cmdline"]) == without_id(want["cmdline"])
                assert plan["source"] == str(path)
                outcomes["allowed image"] += 1
    print(f"CLI race: {outcomes}", file=sys.stderr)
    assert outcomes["allowed image"] >= RACE_ATTEMPTS     # every direct stage worked


@pytest.fixture
def bus_daemon(tmp_path, images, keys) -> Iterator[PrivateBus]:
    bus = PrivateBus().start()
    for d in ("state", "run"):
        (tmp_path / d).mkdir()
    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "platforms"
                    / "vm-no-tpm" / "root", root, symlinks=True)
    config = tmp_path / "relaunchd.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(root), "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(images)],
        "trust": {"certificates": [str(keys["db"].cert)]}, "launch": {"method": "kexec"}}))
    daemon = Daemon(bus, config, engine="fake-machine")
    try:
        daemon.start()
        yield bus
    finally:
        if daemon.proc is not None:
            daemon.stop()
        bus.stop()


def test_race_over_dbus_never_stages_the_other_image(images, keys, attacker, bus_daemon):
    """The issue's D-Bus reproduction (5 of 40 stages took the attacker's image while
    StagedImage showed the allowed path): root calls Stage on the path through nobody's
    flipping link, and on the allowed path itself."""
    from relaunchd.bus import client as bus_client
    from relaunchd.errors import RelaunchError

    want = expected_plan(images, keys)
    client = bus_client.Client(address=bus_daemon.address)
    link = attacker / "d"

    def settle() -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            props = client.properties()
            if props["State"] != "staging":
                return props
            time.sleep(0.02)
        raise AssertionError(f"staging never ended: {props}")

    outcomes = {"refused": 0, "allowed image": 0}
    deadline = time.monotonic() + RACE_SECONDS
    with flipping(link, images, attacker / "own"):
        for attempt in range(RACE_ATTEMPTS):
            assert time.monotonic() < deadline, f"race too slow ({attempt} attempts)"
            paths = [link / "signed.efi"]
            if attempt % 8 == 0:
                paths.append(images / "signed.efi")
            for path in paths:
                try:
                    client.call("Stage", str(path))
                except RelaunchError as exc:
                    assert exc.name == "InvalidImage", exc
                    assert path != images / "signed.efi", exc
                    outcomes["refused"] += 1
                    continue
                props = settle()
                if props["State"] != "staged":
                    assert props["LastError"]["name"] == "InvalidImage", props
                    outcomes["refused"] += 1
                    continue
                staged = props["StagedImage"]
                assert staged["initrd_sha256"] == want["initrd"]["sha256"], \
                    f"staged another image: {staged}"
                assert without_id(staged["cmdline"]) == without_id(want["cmdline"]), staged
                assert staged["path"] == str(path)
                outcomes["allowed image"] += 1
    print(f"D-Bus race: {outcomes}", file=sys.stderr)
    assert outcomes["allowed image"] >= RACE_ATTEMPTS // 8


def test_addon_directories_follow_the_image_rules(images, keys):
    """The per-UKI add-on directory is opened under the image's rules: one that holds
    add-ons but is a link or writable by others stops staging, naming it; an empty one
    that breaks the rules holds nothing the stub would take and is passed over."""
    options = staging.StageOptions(trusted=load_certificates([str(keys["db"].cert)]),
                                   policy=image_files.ImagePolicy((str(images),)),
                                   root=SysRoot(str(images.parent)))
    image = images / "signed.efi"
    extra = images / "signed.efi.extra.d"
    extra.mkdir(mode=0o775)
    os.chmod(extra, 0o775)
    staging.prepare(str(image), options).close()        # empty: nothing to take
    (extra / "x.addon.efi").write_bytes(b"MZ")
    with pytest.raises(InvalidImage, match=f"{extra}: is writable by non-root users"):
        staging.prepare(str(image), options)
    os.chmod(extra, 0o755)
    real = images / "real.d"
    extra.rename(real)
    extra.symlink_to(real)
    with pytest.raises(InvalidImage, match=f"{extra}: is a symbolic link"):
        staging.prepare(str(image), options)


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "group-writable"])
def test_unusable_files_are_refused_by_name_and_leave_no_memfd(images, keys, kind):
    options = staging.StageOptions(trusted=load_certificates([str(keys["db"].cert)]),
                                   policy=image_files.ImagePolicy((str(images),)),
                                   root=SysRoot(str(images.parent)))
    target = images / "x.efi"
    why = {"fifo": "x.efi: is a FIFO, not a regular file",
           "device": "x.efi: is a block device, not a regular file",
           "symlink": "x.efi: is a symbolic link",
           "group-writable": f"{images}/sub is writable by non-root users"}[kind]
    if kind == "fifo":
        os.mkfifo(target, 0o644)
    elif kind == "device":
        os.mknod(target, 0o644 | 0o060000, os.makedev(7, 0))     # S_IFBLK, /dev/loop0
    elif kind == "symlink":
        target.symlink_to(images / "signed.efi")
    else:
        (images / "sub").mkdir(mode=0o775)
        os.chmod(images / "sub", 0o775)
        shutil.copy(images / "signed.efi", images / "sub" / "x.efi")
        target = images / "sub" / "x.efi"
    before = fds()
    started = time.monotonic()
    with pytest.raises(InvalidImage, match=why):
        staging.prepare(str(target), options)
    assert time.monotonic() - started < 5
    assert fds() == before
    assert not any("memfd:" in t for t in fds().values())


def fds() -> dict[str, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            found[name] = os.readlink(f"/proc/self/fd/{name}")
    return found
