#!/usr/bin/env python3
"""`make demo`: a real relaunch through relaunchd, inside a QEMU guest.

1. Build relaunchd's .deb and the Debian 12 guest image (both cached), boot the guest
   (QEMU/TCG, 2 vCPUs, swtpm), relaunchd installed from the .deb.
2. Show `relaunchctl check` and `relaunchctl status` in the guest.
3. Build a signed UKI of the guest's own kernel and initrd with a new command-line
   marker, stage it through D-Bus (`relaunchctl stage`, served by the daemon).
4. `relaunchctl relaunch --wait`, attached: relaunchd measures into PCR 23, hands off to
   systemd, its shutdown hook quiesces, the kernel kexecs; the command exits 0 with
   "the system is going down" before the guest goes.
5. In the new boot: `relaunchctl status --json`. Exit 0 only when `relaunch --wait`
   exited 0 with its going-down line, LastRelaunch.verified is true and the guest runs
   the staged command line.

The same steps are tests in tests/vm/test_service_relaunch.py; this is the tour.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import ukibuild
from vm.deb import build_deb
from vm.guestsetup import IMAGES, configure
from vm.guestuki import guest_uki
from vm.image import guest_image, make_data_disk
from vm.machine import Machine, MachineSpec

CERT = "/etc/relaunchd/demo-db.pem"
BOOT_TIMEOUT = 600


def say(text: str) -> None:
    print(text, flush=True)


def show(guest: Machine, command: str, timeout: float = 300) -> str:
    say(f"\nguest# {command}")
    result = guest.run(command, timeout=timeout, check=False)
    out = result.output.rstrip()
    if out:
        say("\n".join("  " + line for line in out.splitlines()))
    say(f"  -> exit {result.rc}")
    return result.output if result.ok else ""


def main() -> int:
    started = time.monotonic()
    say("relaunchd demo: a measured relaunch of a QEMU guest (TCG: a few minutes)")
    say("  building the .deb and the guest image (cached after the first run) ...")
    deb = build_deb()
    image = guest_image()
    with tempfile.TemporaryDirectory(prefix="relaunchd-demo-") as tmp:
        work = Path(tmp)
        keys = {"db": ukibuild.make_signing_key(work, "db", "relaunchd demo db")}
        marker = f"rld.demo={uuid.uuid4().hex[:12]}"
        uki = guest_uki(image, keys, work, marker, "demo")
        data = make_data_disk({"relaunchd.deb": deb}, work / "data.img")
        with Machine(MachineSpec(image, data_disk=data, no_reboot=False)) as guest:
            boot = guest.boot(timeout=BOOT_TIMEOUT)
            say(f"  guest up in {boot.seconds:.1f} s (boot id {boot.boot_id})")
            configure(guest, cert=keys["db"].cert, cert_path=CERT,
                      written_by="make demo (tests/support/demo.py)")
            guest.put(f"{IMAGES}/demo.efi", uki)

            show(guest, "relaunchctl check")
            show(guest, "relaunchctl status")
            show(guest, f"relaunchctl stage {IMAGES}/demo.efi")
            staged = json.loads(guest.run("relaunchctl status --json").output)
            if staged.get("State") != "staged":
                say(f"demo: staging did not end in 'staged': {staged.get('LastError')}")
                return 1
            say(f"\n  staged {staged['StagedImage']['id']}: quiesce plan, measurement and "
                "hand-off next")
            say("\nguest# relaunchctl relaunch --wait     (the guest goes down now)")
            # Attached: its exit status and output are what kured and Ansible rely on.
            request, boot = guest.transition_attached("relaunchctl relaunch --wait",
                                                      timeout=BOOT_TIMEOUT)
            say("\n".join("  " + line for line in request.output.rstrip().splitlines()))
            say(f"  -> exit {request.rc}")
            waited = request.rc == 0 and request.output == (
                f"relaunch {staged['StagedImage']['id']}: the system is going down\n")
            for _, line in guest.console:
                if "relaunchd-shutdown:" in line:
                    say(f"  console: {line.strip()}")
            say(f"  new boot {boot.boot_id} ready {boot.seconds:.1f} s after the request")

            status = show(guest, "relaunchctl status --json")
            cmdline = guest.run("cat /proc/cmdline").output.split()
            last = json.loads(status).get("LastRelaunch", {}) if status else {}
    ok = waited and bool(last.get("verified")) and marker in cmdline \
        and f"relaunchd.id={last.get('id')}" in cmdline
    say(f"\ndemo: {'VERIFIED' if ok else 'NOT VERIFIED'} relaunch {last.get('id', '?')}: "
        f"measured={last.get('measured')}, downtime {last.get('downtime_ms')} ms, "
        f"mismatches {last.get('mismatches')}, `relaunch --wait` "
        f"{'exited 0' if waited else 'did NOT exit 0 as the system went down'}  "
        f"({time.monotonic() - started:.0f} s in all)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
