"""A UEFI boot of the guest: OVMF → systemd-boot → a UKI of the guest's own
kernel and initrd, so Debian's systemd-stub measures the UKI into PCR 11 of
the swtpm TPM (and systemd-pcrphase extends its phases on top)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from support import ukibuild

from .image import GuestImage

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
UKI_NAME = "relaunchd-guest.efi"


def guest_uki(image: GuestImage, out: Path) -> Path:
    """The guest's kernel, initrd and command line as a UKI on Debian's stub."""
    return ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", ukibuild.OS_RELEASE),
        (".cmdline", image.cmdline.encode()),
        (".uname", image.release.encode()),
        (".initrd", image.initrd),
        (".linux", image.kernel),
    ]), out)


def make_esp(uki: Path, directory: Path) -> Path:
    """An ESP tree: systemd-boot as the removable-media loader, the UKI as a
    Type #2 entry it finds by itself, no menu delay."""
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "EFI" / "BOOT").mkdir(parents=True)
    (directory / "EFI" / "Linux").mkdir(parents=True)
    (directory / "loader").mkdir()
    shutil.copyfile(SYSTEMD_BOOT, directory / "EFI" / "BOOT" / "BOOTX64.EFI")
    shutil.copyfile(uki, directory / "EFI" / "Linux" / UKI_NAME)
    (directory / "loader" / "loader.conf").write_text("timeout 0\n")
    return directory


def fat_image(directory: Path, out: Path, spare_mib: int = 0) -> Path:
    """The ESP tree as a FAT image, built without mounting (mkfs.vfat -C, mcopy). Not
    QEMU's virtual FAT (`fat:ro:DIR`): with it OVMF now and then hangs loading the boot
    loader after a guest reset, which the downtime benchmark's firmware reboots hit."""
    content = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    kib = max(64 << 10, (content * 5 // 4) >> 10)      # room for FAT tables and clusters
    kib += spare_mib << 10                              # room to add files in the guest
    out.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", "-n", "ESP", str(out), str(kib)], check=True,
                   capture_output=True, timeout=120)
    entries = [str(p) for p in sorted(directory.iterdir())]
    subprocess.run(["mcopy", "-s", "-i", str(out), *entries, "::/"], check=True,
                   capture_output=True, timeout=300, env={"MTOOLS_SKIP_CHECK": "1",
                                                          "PATH": "/usr/bin:/bin"})
    return out


def extend(pcr: str, word: str) -> str:
    """sha256 PCR extend with the digest of a phase word, as systemd-pcrphase does."""
    digest = hashlib.sha256(word.encode()).digest()
    return hashlib.sha256(bytes.fromhex(pcr) + digest).hexdigest()
