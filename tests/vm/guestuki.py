"""Signed UKIs of the guest's own kernel and initrd, for relaunching the guest."""

from __future__ import annotations

from pathlib import Path

from support import ukibuild

# Runs first in the next boot's initramfs (rdinit=) and shows on the serial
# console what the initrd relaunchd built contains under /.extra, then hands
# over to initramfs-tools' /init. (Linux 6.1 has no /sys/firmware/initrd.)
RDINIT = b"""#!/bin/sh
echo "rld-extra: $(cd /.extra && echo *)"
[ -e /rld-addon ] && echo "rld-addon: $(cat /rld-addon)"
while read -r line; do echo "rld-osrel: $line"; done < /.extra/os-release
exec /init "$@"
"""


def guest_uki(vm_image, keys, tmp_path: Path, marker: str, name: str,
              signed: bool = True, kernel: Path | None = None, rdinit: bytes = RDINIT,
              extra_cmdline: str = "", stub_version: str | None = None) -> Path:
    """A UKI of the guest's own kernel and initrd (plus an rdinit script, by default
    the probe above; another script can make the new boot fail on purpose).
    `stub_version`: claim another systemd-stub in `.sdmagic` (add-ons need 254/257)."""
    cmdline = f"{vm_image.cmdline} rdinit=/rld-init {marker} {extra_cmdline}".strip().encode()
    base = vm_image.initrd.read_bytes()
    initrd = tmp_path / f"{name}.initrd"
    initrd.write_bytes(base + bytes(-len(base) % 4)
                       + ukibuild.newc_cpio({"rld-init": rdinit}))
    spec = ukibuild.UkiSpec([
        (".osrel", ukibuild.OS_RELEASE), (".cmdline", cmdline),
        (".uname", vm_image.release.encode()), (".initrd", initrd),
        (".linux", kernel or vm_image.kernel),
    ], stub_version=stub_version)
    uki = ukibuild.build_uki(spec, tmp_path / f"{name}.unsigned.efi")
    return ukibuild.sign(uki, keys["db"], tmp_path / f"{name}.efi") if signed else uki




def guest_addon(keys, tmp_path: Path, name: str, cmdline: str, marker: bytes) -> Path:
    """A signed add-on adding `cmdline` and an initrd holding /rld-addon = `marker`."""
    spec = ukibuild.UkiSpec([(".cmdline", cmdline.encode()),
                             (".initrd", ukibuild.newc_cpio({"rld-addon": marker}))])
    built = ukibuild.build_uki(spec, tmp_path / f"{name}.unsigned.addon.efi")
    return ukibuild.sign(built, keys["db"], tmp_path / f"{name}.addon.efi")
