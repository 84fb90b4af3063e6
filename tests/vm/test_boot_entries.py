"""(Named to run before the shared guest boots: this one has its own, booted by UEFI.)
The real systemd-boot 252 as the oracle of relaunchd's boot entry rules.

The ESP holds every fixture tree of tests/fixtures/boot-entries/ at once (version edge
cases, sort keys, boot counting, malformed entries, UKIs), plus two entries that boot
the guest: a Type #1 entry of its kernel and initrd, and a UKI of the same. OVMF starts
systemd-boot, which exports what it saw: `LoaderEntries` (every entry id, in its order)
and `LoaderEntrySelected` (what it booted). relaunchd must have predicted both — on the
host before the boot, from the same tree, and in the guest from the mounted ESP and the
real efivarfs. Then the one-shot: the guest sets `LoaderEntryOneShot` as
`bootctl set-oneshot` does, relaunchd must name that entry as the next boot, and after a
firmware reboot systemd-boot must have booted it (and cleared the variable).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaunchd.platform import boot_entries
from relaunchd.platform.sysroot import SysRoot
from support import bootfixtures, ukibuild

from .image import make_data_disk
from .machine import Machine, MachineSpec
from .uefi import SYSTEMD_BOOT

BOOT_TIMEOUT = 900
GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
TYPE1 = "relaunchd-guest.conf"
TYPE2 = "relaunchd-guest.efi"

# Read the loader's variables with plain Python in the guest, not with relaunchd's
# decoder: {name: [strings]} for the variables that exist.
READ_VARS = f"""python3 - <<'PY'
import json, os
out = {{}}
for name in ("LoaderEntries", "LoaderEntrySelected", "LoaderEntryOneShot", "LoaderInfo"):
    path = "/sys/firmware/efi/efivars/" + name + "-{GUID}"
    if os.path.exists(path):
        data = open(path, "rb").read()[4:].decode("utf-16-le")
        out[name] = [s for s in data.split("\\0") if s]
print(json.dumps(out))
PY"""
LIST = """python3 - <<'PY'
import json
from relaunchd.platform import boot_entries
from relaunchd.platform.sysroot import SysRoot
print(json.dumps(boot_entries.list_entries(SysRoot("/")).to_json()))
PY"""
# What `bootctl set-oneshot ID` writes: attributes NV|BS|RT, UTF-16LE, NUL.
SET_ONESHOT = f"""python3 - <<'PY'
path = "/sys/firmware/efi/efivars/LoaderEntryOneShot-{GUID}"
open(path, "wb").write(b"\\x07\\0\\0\\0" + "{TYPE2}\\0".encode("utf-16-le"))
PY"""


def build_esp(image, work: Path) -> tuple[Path, str, str]:
    """The ESP directory, and the command lines of the two bootable entries."""
    esp = work / "esp"
    esp.mkdir()
    bootfixtures.merged_esp(esp, bootfixtures.scenarios())
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(SYSTEMD_BOOT.read_bytes())
    (esp / "guest").mkdir()
    (esp / "guest" / "vmlinuz").write_bytes(image.kernel.read_bytes())
    (esp / "guest" / "initrd.img").write_bytes(image.initrd.read_bytes())
    type1_options = f"{image.cmdline} relaunchd.bootentry=type1"
    (esp / "loader" / "entries" / TYPE1).write_text(
        "title relaunchd guest (Type #1)\nsort-key relaunchd\nversion 1\n"
        "linux /guest/vmlinuz\ninitrd /guest/initrd.img\n"
        f"options {image.cmdline}\noptions relaunchd.bootentry=type1\n")
    type2_cmdline = f"{image.cmdline} relaunchd.bootentry=type2"
    ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b'PRETTY_NAME="relaunchd guest (Type #2)"\nID=relaunchd\nVERSION_ID=2\n'),
        (".cmdline", type2_cmdline.encode()), (".uname", image.release.encode()),
        (".initrd", image.initrd), (".linux", image.kernel)]), esp / "EFI" / "Linux" / TYPE2)
    (esp / "loader" / "loader.conf").write_text("timeout 0\ndefault relaunchd-guest.c*\n")
    # systemd-boot reads the loader's `initrd=` words in front of the options (252's
    # initrd_prepare), with the path as it converted it.
    return esp, f"initrd=\\guest\\initrd.img {type1_options}", type2_cmdline


@pytest.fixture(scope="module")
def loader_guest(vm_image, relaunchd_deb, tmp_path_factory, vm_timings
                 ) -> Iterator[tuple[Machine, Path, str, str]]:
    work = tmp_path_factory.mktemp("vm-entries")
    esp, type1_cmdline, type2_cmdline = build_esp(vm_image, work)
    data = make_data_disk({"relaunchd.deb": relaunchd_deb}, work / "data.img")
    with Machine(MachineSpec(vm_image, data_disk=data, esp=esp)) as machine:
        boot = machine.boot(timeout=BOOT_TIMEOUT)
        vm_timings.add("uefi_boot_to_ready", boot.seconds)
        # The data disk's mount has a 20 s device timeout (fstab, nofail): on a loaded
        # machine it can miss it, and the .deb is then not installed at boot. Do it now.
        machine.run("mountpoint -q /srv/rld || mount /srv/rld; /usr/local/sbin/rld-provision"
                    " && python3 -c 'import relaunchd'", timeout=300)
        machine.run("mkdir -p /efi && mount -o ro LABEL=ESP /efi")
        yield machine, esp, type1_cmdline, type2_cmdline
        machine.poweroff()


def loader_order(variables: dict) -> list[str]:
    """systemd-boot's entries minus the ones it adds itself (auto-*)."""
    return [i for i in variables["LoaderEntries"] if not i.startswith("auto-")]


def test_systemd_boot_orders_and_picks_as_predicted(loader_guest):
    machine, esp, type1_cmdline, _ = loader_guest
    predicted = boot_entries.list_entries(SysRoot(str(esp.parent)), esp="/esp",
                                          machine="x64")
    variables = json.loads(machine.run(READ_VARS).output)
    assert variables["LoaderInfo"][0].startswith("systemd-boot 252")
    listed = [e.id for e in predicted.entries if e.position is not None]
    assert loader_order(variables) == listed
    hidden = {e.id for e in predicted.entries if e.position is None}
    assert hidden and not hidden & set(variables["LoaderEntries"])
    assert predicted.next_boot.id == TYPE1
    assert variables["LoaderEntrySelected"] == [TYPE1]
    assert machine.run("cat /proc/cmdline").output.strip() == type1_cmdline

    # The same listing made by relaunchd inside the guest, from the mounted ESP (found
    # as bootctl finds it) and the real efivarfs.
    inside = json.loads(machine.run(LIST).output)
    assert inside["esp"] == "/efi" and inside["loader"].startswith("systemd-boot 252")
    assert inside["selected"] == TYPE1
    assert [e["id"] for e in inside["entries"] if e["position"] is not None] == listed
    assert (inside["next_boot"], inside["next_boot_reason"]) == (TYPE1, "loader.conf default")


def test_oneshot_changes_the_next_boot(loader_guest):
    machine, _, type1_cmdline, type2_cmdline = loader_guest
    machine.run(SET_ONESHOT)
    inside = json.loads(machine.run(LIST).output)
    assert (inside["next_boot"], inside["next_boot_reason"]) == (TYPE2, "LoaderEntryOneShot")
    assert inside["default"] == TYPE1
    machine.power_cycle("systemctl --no-block reboot", timeout=BOOT_TIMEOUT)
    variables = json.loads(machine.run(READ_VARS).output)
    assert variables["LoaderEntrySelected"] == [TYPE2]
    assert "LoaderEntryOneShot" not in variables            # the loader used it up
    assert machine.run("cat /proc/cmdline").output.strip() == type2_cmdline
    machine.run("mkdir -p /efi && mount -o ro LABEL=ESP /efi")
    inside = json.loads(machine.run(LIST).output)
    assert (inside["next_boot"], inside["selected"]) == (TYPE1, TYPE2)
