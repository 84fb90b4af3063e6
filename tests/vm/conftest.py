"""Fixtures of the vm tier: one Debian 12 guest per session, the project inside
it from its own .deb, timing figures reported at the end.

The guest is shared (booting under TCG costs ~25 s); tests that relaunch or
reboot it wait for the next boot themselves, so later tests still find a
ready guest. RELAUNCHD_SKIP_VM=1 skips the tier (it never skips silently)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ukibuild

from .deb import build_deb
from .image import GuestImage, guest_image, make_data_disk
from .machine import Machine, MachineSpec, free_loopback_port
from .timings import Timings

TOOLS = ("qemu-system-x86_64", "qemu-img", "swtpm", "debootstrap", "mke2fs",
         "dpkg-buildpackage")
BOOT_TIMEOUT = 600  # TCG on a loaded 2-core CI machine; a boot here takes ~25 s
# Two empty disks for the sealed-volume test (LUKS2 in the guest), by serial.
LUKS_DISKS = ("rldluks1", "rldluks2")
LUKS_DISK_MIB = 32

_timings = Timings()
_image_key: list[str] = []


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    if os.environ.get("RELAUNCHD_SKIP_VM") == "1":
        skip = pytest.mark.skip(reason="RELAUNCHD_SKIP_VM=1")
        for item in items:
            if here in Path(str(item.fspath)).parents:
                item.add_marker(skip)
    # Modules that boot a guest of their own run before the shared guest boots, so two
    # QEMUs never share the CPUs (the shared one lives until the end of the session).
    # Stable: file order otherwise.
    places = [n for n, item in enumerate(items) if here in Path(str(item.fspath)).parents]
    ordered = sorted((items[n] for n in places),
                     key=lambda item: "guest" in getattr(item, "fixturenames", ()))
    for n, item in zip(places, ordered, strict=True):
        items[n] = item


def pytest_terminal_summary(terminalreporter):
    if not _timings.figures:
        return
    path = _timings.save(_image_key[0] if _image_key else "?")
    terminalreporter.section("relaunchd VM timings (TCG)")
    terminalreporter.write_line(_timings.table())
    terminalreporter.write_line(f"  recorded in {path}")


@pytest.fixture(scope="session")
def vm_timings() -> Timings:
    return _timings


@pytest.fixture(scope="session")
def vm_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"vm tier needs {', '.join(missing)}: run `make setup` "
                    "(.ci/vm-packages.txt), or RELAUNCHD_SKIP_VM=1 to skip the tier")


@pytest.fixture(scope="session")
def relaunchd_deb(vm_tools) -> Path:
    return build_deb()


@pytest.fixture(scope="session")
def vm_image(vm_tools) -> GuestImage:
    img = guest_image()
    _image_key.append(img.key)
    if img.build_seconds is not None:
        _timings.add("image_build", img.build_seconds)
    return img


@pytest.fixture(scope="session")
def vm_uki(tmp_path_factory, debian_kernel) -> Path:
    """A minimal real UKI (Debian's stub + Debian's cloud kernel) for the guest."""
    out = tmp_path_factory.mktemp("vm-uki") / "minimal.efi"
    return ukibuild.build_uki(ukibuild.UkiSpec([(".linux", debian_kernel.vmlinuz)]), out)


@pytest.fixture(scope="session")
def guest(vm_image, relaunchd_deb, vm_uki, tmp_path_factory) -> Iterator[Machine]:
    """The booted guest: relaunchd installed from the .deb, test files in /srv/rld."""
    work = tmp_path_factory.mktemp("vm-data")
    data = make_data_disk({"relaunchd.deb": relaunchd_deb, "minimal.efi": vm_uki},
                          work / "data.img")
    scratch = []
    for serial in LUKS_DISKS:
        disk = work / f"{serial}.raw"
        with open(disk, "wb") as f:       # sparse: costs nothing until written
            f.truncate(LUKS_DISK_MIB << 20)
        scratch.append((disk, serial))
    # no_reboot=False: the reboot-timing test needs QEMU to survive a reset.
    spec = MachineSpec(vm_image, data_disk=data, no_reboot=False,
                       scratch_disks=tuple(scratch), ssh_port=free_loopback_port())
    with Machine(spec) as machine:
        boot = machine.boot(timeout=BOOT_TIMEOUT)
        _timings.add("boot_to_ready", boot.seconds)
        _timings.guest["first boot"] = machine.run("systemd-analyze time", check=False)\
            .output.splitlines()[0]
        yield machine
        machine.poweroff()
