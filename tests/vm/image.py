"""The Debian 12 guest image: debootstrap once, cache by inputs, boot many times.

Layout under `$RELAUNCHD_CACHE/vm/<key>/` (key = hash of everything that shapes
the image: suite, mirror, package list, the files in `rootfs/`, this module):

    disk.raw      ext4 root filesystem made with `mke2fs -d` (no mounts needed)
    vmlinuz       the guest's own kernel and initrd, for -kernel/-initrd
    initrd.img
    image.json    kernel release, package versions, build time
    .complete     written last; a directory without it is rebuilt

The rootfs is made with debootstrap into a directory under the cache (never the
host's root) and deleted once the disk image exists. Nothing is ever mounted by
this module; debootstrap mounts proc/sys inside its target, so before deleting
a target we make sure nothing is mounted below it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support.ukibuild import cache_dir

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ROOTFS_OVERLAY = Path(__file__).resolve().parent / "rootfs"

# What the guest needs besides minbase. python3-ply and libpam-systemd are
# spelled out because debootstrap's --include does not resolve virtual
# packages (vm-notes.md).
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "polkitd", "libpam-systemd", "udev",
    "linux-image-cloud-amd64", "initramfs-tools",
    "python3", "python3-pydbus", "python3-systemd", "python3-pefile", "python3-tpm2-pytss",
    "python3-yaml", "python3-psutil", "python3-cryptography", "python3-asn1crypto",
    "python3-ply",
    "kexec-tools", "tpm2-tools", "procps", "less",
    # Sealed volumes (test_service_luks.py): the cryptsetup CLI to format LUKS2 volumes.
    # systemd-cryptenroll, systemd-cryptsetup and the systemd-tpm2 token plugin come with
    # systemd 252 itself, and the libtss2 libraries it dlopen()s (esys, rc, mu, the device
    # TCTI) with python3-tpm2-pytss and tpm2-tools above.
    "cryptsetup-bin",
    # The Ansible role's test (test_service_ansible.py) reaches the guest over SSH; the
    # key it logs in with is made per run and put in by the agent, never baked in here.
    "openssh-server",
]

# Units that only cost boot time or act on their own in a test guest. The guest's one
# NIC is QEMU user networking, configured statically (rootfs/etc/systemd/network):
# nothing waits for it to be "online".
MASKED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "e2scrub_reap.service", "fstrim.timer", "systemd-networkd-wait-online.service"]
# Debian's kexec-tools loads a kernel at every boot and kexecs on every reboot
# when LOAD_KEXEC=true; baselines must measure only what the test asks for.
KEXEC_DISABLED_UNITS = ["kexec-load.service", "kexec.service"]

DEBOOTSTRAP_TIMEOUT = 30 * 60
MKFS_TIMEOUT = 10 * 60


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    release: str
    key: str
    build_seconds: float | None = None  # set when this call built it (cold cache)

    @property
    def cmdline(self) -> str:
        # fsck.mode=skip: the disk is pristine (runs use an overlay); saves boot time.
        return "root=/dev/vda rw console=ttyS0,115200 fsck.mode=skip"


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (RELAUNCHD_VM_MIRROR overrides)."""
    if env := os.environ.get("RELAUNCHD_VM_MIRROR"):
        return env
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    for text in texts:
        for m in re.finditer(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.endswith("/debian") and "security" not in uri:
                return uri
    return DEFAULT_MIRROR


def _overlay_files() -> list[Path]:
    return sorted(p for p in ROOTFS_OVERLAY.rglob("*") if p.is_file())


def image_key(mirror: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"suite": SUITE, "mirror": mirror, "packages": PACKAGES,
                         "masked": MASKED_UNITS, "kexec": KEXEC_DISABLED_UNITS}).encode())
    h.update(Path(__file__).read_bytes())
    for path in _overlay_files():
        h.update(str(path.relative_to(ROOTFS_OVERLAY)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
        h.update(str(path.stat().st_mode & 0o777).encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[vm-image] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{cmd[0]} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _remove_tree(path: Path) -> None:
    """rm -rf that refuses to cross into anything mounted (debootstrap leftovers)."""
    if not path.exists():
        return
    for point in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], timeout=60, check=False)
    if left := _mounts_below(path):
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    _run(["rm", "-rf", "--one-file-system", str(path)], timeout=600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def guest_image(rebuild: bool = False) -> GuestImage:
    """The cached guest image for the current inputs, built if missing."""
    mirror = host_mirror()
    key = image_key(mirror)
    root = cache_dir() / "vm"
    root.mkdir(exist_ok=True)
    directory = root / key
    built = None
    with _locked(root / ".lock"):
        if rebuild or not (directory / ".complete").exists():
            start = time.monotonic()
            _build(directory, mirror, key)
            built = time.monotonic() - start
            _prune(root, keep=directory)
    meta = json.loads((directory / "image.json").read_text())
    return GuestImage(directory=directory, disk=directory / "disk.raw",
                      kernel=directory / "vmlinuz", initrd=directory / "initrd.img",
                      release=meta["release"], key=key, build_seconds=built)


def _prune(root: Path, keep: Path, keep_count: int = 2) -> None:
    """Drop images of older inputs (each is ~0.5 GB), keeping the newest few."""
    images = sorted((d for d in root.iterdir() if (d / ".complete").exists() and d != keep),
                    key=lambda d: (d / ".complete").stat().st_mtime, reverse=True)
    for old in images[keep_count - 1:]:
        _log(f"removing old guest image {old.name}")
        _remove_tree(old)


def _build(directory: Path, mirror: str, key: str) -> None:
    start = time.monotonic()
    _remove_tree(directory)
    directory.mkdir(parents=True)
    target = directory / "rootfs"
    _log(f"debootstrap {SUITE} from {mirror} into {target} (a few minutes)")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          SUITE, str(target), mirror], timeout=DEBOOTSTRAP_TIMEOUT)
    if left := _mounts_below(target):
        raise RuntimeError(f"debootstrap left mounts behind: {left}")
    _log(f"debootstrap done in {time.monotonic() - start:.0f} s; configuring")
    release = _configure(target)
    _log("mke2fs -d")
    # Sparse: room for staged images and logs costs nothing until written.
    _make_ext4(target, directory / "disk.raw", label="rldroot", min_mib=2048)
    meta = {
        "key": key, "suite": SUITE, "mirror": mirror, "release": release,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - start, 1),
        "packages": _package_versions(target),
    }
    (directory / "image.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    _remove_tree(target)
    (directory / ".complete").touch()
    _log(f"guest image {key} ready in {time.monotonic() - start:.0f} s")


def _configure(target: Path) -> str:
    """Turn the debootstrapped tree into a bootable test guest, without chroot or mounts."""
    for src in _overlay_files():
        dst = target / src.relative_to(ROOTFS_OVERLAY)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    (target / "srv" / "rld").mkdir(parents=True, exist_ok=True)
    hosts = "127.0.0.1 localhost\n127.0.1.1 relaunchd-guest\n"
    (target / "etc" / "hosts").write_text(hosts)

    default_kexec = target / "etc" / "default" / "kexec"
    text = default_kexec.read_text() if default_kexec.exists() else ""
    text = re.sub(r"^LOAD_KEXEC=.*$", "LOAD_KEXEC=false", text, flags=re.M)
    if "LOAD_KEXEC=false" not in text:
        text += "LOAD_KEXEC=false\n"
    default_kexec.write_text(text)
    # Keep debconf in agreement, so a reconfigure inside the guest does not flip it back.
    _run(["chroot", str(target), "debconf-set-selections"], timeout=120,
         input="kexec-tools kexec-tools/load_kexec boolean false\n")

    systemctl = ["systemctl", f"--root={target}"]
    # serial-getty@ttyS0 comes from systemd-getty-generator (console=ttyS0).
    _run([*systemctl, "enable", "rld-agent.service", "rld-provision.service",
          "systemd-networkd.service"], timeout=120)
    existing = [u for u in KEXEC_DISABLED_UNITS if _unit_exists(target, u)]
    _run([*systemctl, "mask", *MASKED_UNITS, *existing], timeout=120)

    kernels = sorted((target / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError("no kernel in the guest's /boot")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = target / "boot" / f"initrd.img-{release}"
    if not initrd.exists():
        raise RuntimeError(f"no initrd for {release} in the guest's /boot (initramfs-tools?)")
    shutil.copy2(kernels[-1], target.parent / "vmlinuz")
    shutil.copy2(initrd, target.parent / "initrd.img")
    # A smaller image and no stale indexes: the guest never talks to a mirror.
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (target / d).glob("*"):
            if p.is_file():
                p.unlink()
    return release


def _unit_exists(target: Path, unit: str) -> bool:
    sysv = target / "etc" / "init.d" / unit.removesuffix(".service")
    return sysv.exists() or any((target / d / unit).is_symlink() or (target / d / unit).exists()
                                for d in ("lib/systemd/system", "usr/lib/systemd/system"))


def _package_versions(target: Path) -> dict[str, str]:
    out = _run(["dpkg-query", f"--admindir={target}/var/lib/dpkg", "-W",
                "-f=${Package}\t${Version}\n"], timeout=60).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def _du_bytes(path: Path) -> int:
    return int(_run(["du", "-sxb", str(path)], timeout=300).stdout.split()[0])


def _make_ext4(source: Path, image: Path, label: str, min_mib: int = 0) -> None:
    """An ext4 image holding `source`, made by mke2fs -d: no loop device, no mount."""
    size_mib = max(min_mib, int(_du_bytes(source) * 1.3 / 2**20) + 128)
    image.unlink(missing_ok=True)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", str(source),
          str(image), f"{size_mib}M"], timeout=MKFS_TIMEOUT)


def make_data_disk(files: dict[str, Path | bytes], image: Path) -> Path:
    """A small ext4 disk (label RLDDATA) with the given files at its root, for one run."""
    staging = image.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, content in files.items():
            dst = staging / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
        _make_ext4(staging, image, label="RLDDATA", min_mib=16)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


if __name__ == "__main__":
    img = guest_image(rebuild="--rebuild" in sys.argv)
    print(json.dumps({"directory": str(img.directory), "release": img.release}, indent=1))
