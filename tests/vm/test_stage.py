"""relaunchd's own staging, proven by relaunching the guest (issue: staging).

1. kexec_file_load path: a signed UKI built from the guest's own kernel and
   initrd is staged by `relaunchctl stage`, the guest relaunches with
   `systemctl kexec` (which keeps a preloaded image), and the new boot runs
   exactly the staged command line with the generated `.extra/` cpios in its
   initrd; with a per-UKI add-on, its command line and initrd are in the new boot too.
2. Segment loader path: the guest relaunches through relaunchd's own zero
   page and purgatory; the new kernel shows the SLRT address at 0x078 and the
   SLRT in a setup_data node, byte-identical to what was built.
3. Bad inputs leave nothing loaded and no state behind.

Runs last in the tier (file order); the guest is left booted and unlocked."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from .guestsetup import IMAGES
from .guestuki import guest_addon, guest_uki

KEXEC_TIMEOUT = 600
CERT = "/etc/relaunchd/test-db.pem"
SLRT_SETUP_TYPE = 0x524C0001


@pytest.fixture(scope="module")
def staged_setup(guest, keys):
    guest.run(f"install -d -m 0755 {IMAGES} /etc/relaunchd")
    guest.put(CERT, keys["db"].cert)
    return guest


def stage(guest, path: str, *extra: str, check: bool = True):
    # --local: this file proves the staging path itself; the daemon path has its own tests.
    result = guest.run(f"relaunchctl stage --local --json --cert {CERT} {' '.join(extra)} {path}",
                       timeout=300, check=check)
    return result, (json.loads(result.output[result.output.index("{"):])
                    if result.ok else None)


def nothing_loaded(guest) -> bool:
    return guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "0"


def test_stage_and_relaunch_with_kexec_file_load(staged_setup, vm_image, keys, tmp_path,
                                                 vm_timings):
    guest = staged_setup
    marker = f"rld.stage={uuid.uuid4().hex[:12]}"
    guest.put(f"{IMAGES}/next.efi", guest_uki(vm_image, keys, tmp_path, marker, "next"))
    _, plan = stage(guest, f"{IMAGES}/next.efi")
    assert plan["loaded"] is True and plan["loader"] == "file"
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "1"
    old_boot = guest.boot_id()

    boot = guest.transition("systemctl --no-block kexec", timeout=KEXEC_TIMEOUT)
    vm_timings.add("relaunchd_stage_kexec_to_ready", boot.seconds)
    assert boot.boot_id != old_boot
    assert guest.run("cat /proc/cmdline").output.strip() == plan["cmdline"]
    assert f"relaunchd.id={plan['id']}" in plan["cmdline"].split()
    assert marker in plan["cmdline"].split()
    # The new kernel's initramfs held the cpio relaunchd generated from .osrel.
    assert guest.console_time("rld-extra: os-release", boot.since), guest.console_tail()
    assert guest.console_time('rld-osrel: PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"',
                              boot.since), guest.console_tail()
    assert nothing_loaded(guest)


def test_addons_reach_the_next_boot(staged_setup, vm_image, keys, tmp_path):
    """A per-UKI add-on (`next.efi.extra.d/`) with a command line and an initrd: after
    the relaunch both are in the running system, as systemd-stub would have put them."""
    guest = staged_setup
    marker = f"rld.uki={uuid.uuid4().hex[:12]}"
    addon_marker = f"rld.addon={uuid.uuid4().hex[:12]}"
    content = uuid.uuid4().hex.encode()
    guest.put(f"{IMAGES}/addon.efi", guest_uki(vm_image, keys, tmp_path, marker, "addon",
                                               stub_version="257.9-1"))
    guest.run(f"install -d -m 0755 {IMAGES}/addon.efi.extra.d")
    guest.put(f"{IMAGES}/addon.efi.extra.d/50-test.addon.efi",
              guest_addon(keys, tmp_path, "test", addon_marker, content))
    _, plan = stage(guest, f"{IMAGES}/addon.efi")
    assert [a["sections"] for a in plan["addons"]] == [[".cmdline", ".initrd"]]
    assert plan["initrd"]["parts"][-1] == "50-test.addon.efi:.initrd"
    boot = guest.transition("systemctl --no-block kexec", timeout=KEXEC_TIMEOUT)
    words = guest.run("cat /proc/cmdline").output.split()
    assert words == plan["cmdline"].split()
    assert words.index(marker) < words.index(addon_marker) < words.index(
        f"relaunchd.id={plan['id']}")
    assert guest.console_time(f"rld-addon: {content.decode()}", boot.since), \
        guest.console_tail()
    assert nothing_loaded(guest)


def test_relaunch_through_the_segment_loader(staged_setup, vm_image, keys, tmp_path,
                                             vm_timings):
    guest = staged_setup
    marker = f"rld.segments={uuid.uuid4().hex[:12]}"
    guest.put(f"{IMAGES}/seg.efi", guest_uki(vm_image, keys, tmp_path, marker, "seg"))
    _, plan = stage(guest, f"{IMAGES}/seg.efi", "--loader", "segments")
    assert plan["loader"] == "segments" and plan["loaded"] is True
    slr_addr = plan["segments"]["slr_table_addr"]
    assert slr_addr and plan["slrt"]["address"] == slr_addr

    boot = guest.transition("systemctl --no-block kexec", timeout=KEXEC_TIMEOUT)
    vm_timings.add("relaunchd_segments_kexec_to_ready", boot.seconds)
    assert guest.run("cat /proc/cmdline").output.strip() == plan["cmdline"]
    zero_page = guest.run("od -An -tx1 -v -j 120 -N 8 /sys/kernel/boot_params/data")\
        .output.split()
    assert int.from_bytes(bytes(int(b, 16) for b in zero_page), "little") == slr_addr
    # Find our setup_data node and check it byte for byte, then parse it back.
    script = (
        "import glob,hashlib,json\n"
        "from relaunchd.formats import slrt\n"
        "for d in sorted(glob.glob('/sys/kernel/boot_params/setup_data/*')):\n"
        "    t = int(open(d + '/type').read(), 16)\n"
        f"    if t == {SLRT_SETUP_TYPE}:\n"
        "        data = open(d + '/data', 'rb').read()\n"
        "        table = slrt.parse(data)\n"
        "        dl = next(e for e in table.entries if type(e).__name__ == 'DlInfo')\n"
        "        print(json.dumps({'sha256': hashlib.sha256(data).hexdigest(),\n"
        "                          'size': len(data), 'dlme_base': dl.dlme_base}))\n")
    guest.put("/tmp/read_slrt.py", script.encode())
    found = json.loads(guest.run("python3 /tmp/read_slrt.py").output.strip().splitlines()[-1])
    assert found["sha256"] == plan["slrt"]["sha256"]
    kernel = next(s for s in plan["segments"]["segments"] if s["name"] == "kernel")
    assert found["dlme_base"] == kernel["address"]


def test_bad_inputs_leave_nothing_behind(staged_setup, vm_image, keys, tmp_path):
    guest = staged_setup
    assert nothing_loaded(guest)
    good = guest_uki(vm_image, keys, tmp_path, "rld.bad=1", "good")
    # tampered after signing
    data = bytearray(good.read_bytes())
    at = data.find(b"rld.bad=1")
    data[at:at + 9] = b"rld.BAD=1"
    guest.put(f"{IMAGES}/tampered.efi", bytes(data))
    result, _ = stage(guest, f"{IMAGES}/tampered.efi", check=False)
    assert result.rc == 1 and "VerificationFailed" in result.output
    # not a PE at all
    guest.put(f"{IMAGES}/garbage.efi", b"MZ" + bytes(200))
    result, _ = stage(guest, f"{IMAGES}/garbage.efi", check=False)
    assert result.rc == 2 and "InvalidImage" in result.output
    assert nothing_loaded(guest)
    assert guest.run("ls /run/relaunchd/staged.json", check=False).rc != 0


def test_lockdown_refuses_segments_and_unsigned_kernels(staged_setup, vm_image, keys,
                                                        tmp_path):
    """Integrity lockdown (set at runtime, one way): the segment loader is refused
    before anything is read, and a UKI whose inner kernel is unsigned is refused
    by the kernel itself (EPERM: lockdown without a valid signature); nothing
    stays loaded. Leaves the guest locked down until it powers off, so this must
    stay the last test of the tier (tests/vm/test_stage.py sorts last).

    Seen here: even Debian's signed kernel is refused in this guest, because a
    SeaBIOS boot has no UEFI db, so the platform keyring that would trust the
    Debian Secure Boot CA is empty (uki.md §3.2)."""
    guest = staged_setup
    unsigned_kernel = tmp_path / "vmlinuz.unsigned"
    unsigned_kernel.write_bytes(vm_image.kernel.read_bytes())
    subprocess.run(["sbattach", "--remove", str(unsigned_kernel)], check=True,
                   capture_output=True)
    guest.put(f"{IMAGES}/unsigned-inner.efi",
              guest_uki(vm_image, keys, tmp_path, "rld.unsigned=1", "unsigned-inner",
                        kernel=unsigned_kernel))
    guest.put(f"{IMAGES}/signed.efi",
              guest_uki(vm_image, keys, tmp_path, "rld.locked=1", "signed"))
    guest.run("echo integrity > /sys/kernel/security/lockdown")
    result, _ = stage(guest, f"{IMAGES}/signed.efi", "--loader", "segments", check=False)
    assert result.rc == 1 and "lockdown" in result.output
    result, _ = stage(guest, f"{IMAGES}/unsigned-inner.efi", check=False)
    assert result.rc == 1 and "KexecFailed" in result.output and "EPERM" in result.output
    assert nothing_loaded(guest)
    assert guest.run("ls /run/relaunchd/staged.json", check=False).rc != 0
