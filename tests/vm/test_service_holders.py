"""The hardened unit in the guest, for issue #14: under the unit's own sandbox the quiesce
plan's holder scan sees the processes that hold the TPM — one of another user and one of
root with every capability — and says it inspected everything, and `systemd-analyze
verify` has nothing to say about the installed unit.

Runs after test_service and before test_service_relaunch (file order), whose last test
leaves relaunchd masked for the rest of that boot."""

from __future__ import annotations

import json
import uuid

from .guestsetup import CONFIG, IMAGES, configure
from .guestuki import guest_uki

CERT = "/etc/relaunchd/test-db.pem"


def holder(guest, user: str) -> int:
    """A process of `user` that keeps /dev/tpmrm0 open (the tss group may open it)."""
    out = guest.run(f"setsid -f runuser -u {user} -- sh -c 'exec 3<>/dev/tpmrm0; "
                    f"echo $$ > /tmp/rld-holder-{user}; exec sleep 600' "
                    "</dev/null >/dev/null 2>&1; sleep 1; "
                    f"cat /tmp/rld-holder-{user}")
    return int(out.output.strip())


def test_holder_scan_sees_everything_under_the_unit(guest, vm_image, keys, tmp_path):
    configure(guest, cert=keys["db"].cert, cert_path=CERT,
              written_by="tests/vm/test_service_security.py")
    pids = {}
    try:
        pids = {user: holder(guest, user) for user in ("tss", "root")}
        marker = f"rld.security={uuid.uuid4().hex[:12]}"
        guest.put(f"{IMAGES}/security.efi",
                  guest_uki(vm_image, keys, tmp_path, marker, "security"))
        guest.run(f"relaunchctl stage {IMAGES}/security.efi", timeout=300)
        staged = json.loads(guest.run("relaunchctl status --json").output)["StagedImage"]
        plan = staged["quiesce"]
        held = {h["pid"]: h["path"] for h in plan["holders"]}
        for user, pid in pids.items():
            assert held.get(pid) == "/dev/tpmrm0", (user, pid, plan)
        assert plan["uninspected"] == 0, plan
        assert not any("could not inspect" in n for n in plan.get("notes", [])), plan
        guest.run("relaunchctl cancel")
    finally:
        for pid in pids.values():
            guest.run(f"kill {pid}", check=False)
        guest.run(f"rm -f {CONFIG} /tmp/rld-holder-* && systemctl restart relaunchd",
                  check=False)


def test_installed_unit_verifies_cleanly(guest):
    # --man=no: the guest has no man-db; test_docs.py checks the pages on the host.
    out = guest.run("systemd-analyze verify --man=no relaunchd.service 2>&1", check=False)
    lines = [line for line in out.output.splitlines() if "relaunchd" in line]
    assert out.rc == 0 and not lines, out.output
