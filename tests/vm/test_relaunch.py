"""Baseline relaunch with Debian's own tools, and a full reboot for comparison.

These are the reference figures relaunchd must match and beat: `kexec -s -l`
(kexec_file_load) of the guest's own kernel and initrd with a marker on the
command line, then `systemctl kexec`; and `systemctl reboot` through SeaBIOS.
Everything here happens inside the guest."""

from __future__ import annotations

import uuid

from .machine import Boot, Machine
from .timings import Timings

KEXEC_TIMEOUT = 600


def record_phases(guest: Machine, boot: Boot, timings: Timings, name: str,
                  last_line: str) -> None:
    """Split a transition at the old kernel's last console line and the new
    kernel's first ("Linux version", printed once its console is up)."""
    down = guest.console_time(last_line, boot.since)
    up = guest.console_time("Linux version", down) if down else None
    if down and up:
        timings.add(f"{name}_shutdown", down - boot.since)
        timings.add(f"{name}_handover", up - down)
        timings.add(f"{name}_boot", boot.ready - up)


def test_baseline_kexec_relaunch(guest, vm_timings):
    release = guest.run("uname -r").output.strip()
    marker = f"rld.baseline={uuid.uuid4().hex[:12]}"
    old_boot = guest.boot_id()
    guest.run(f"kexec -s -l /boot/vmlinuz-{release} --initrd=/boot/initrd.img-{release} "
              f"--append=\"$(cat /proc/cmdline) {marker}\"")
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "1"

    boot = guest.transition("systemctl --no-block kexec", timeout=KEXEC_TIMEOUT)
    vm_timings.add("kexec_to_ready", boot.seconds)
    record_phases(guest, boot, vm_timings, "kexec", "kexec_core: Starting new kernel")
    vm_timings.guest["after kexec"] = guest.run("systemd-analyze time", check=False)\
        .output.splitlines()[0]

    assert boot.boot_id != old_boot
    assert guest.boot_id() == boot.boot_id
    cmdline = guest.run("cat /proc/cmdline").output
    assert marker in cmdline.split()
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "0"
    assert guest.run("uname -r").output.strip() == release
    # The TPM was not reset by the kexec, and the new kernel still reaches it.
    assert guest.run("test -c /dev/tpmrm0 && tpm2_pcrread sha256:0 >/dev/null").ok


def test_firmware_reboot_for_comparison(guest, vm_timings):
    old_boot = guest.boot_id()
    boot = guest.transition("systemctl --no-block reboot", timeout=KEXEC_TIMEOUT)
    vm_timings.add("reboot_to_ready", boot.seconds)
    record_phases(guest, boot, vm_timings, "reboot", "reboot: Restarting system")
    vm_timings.guest["after reboot"] = guest.run("systemd-analyze time", check=False)\
        .output.splitlines()[0]
    assert boot.boot_id != old_boot
    # Through firmware, the command line is QEMU's again: no marker of a kexec.
    assert "rld.baseline=" not in guest.run("cat /proc/cmdline").output
