"""relaunchd as a real systemd service in the guest: the hardened unit, the
system bus, polkit (issue: the service). Staging through the daemon proves the
unit's sandbox still lets it kexec_file_load; nothing is relaunched here."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from pathlib import Path

from relaunchd.formats import txt_dl_handler
from support import ukibuild

BUILT_HANDLER = Path(__file__).resolve().parents[2] / "build/dl-handler/txt-dl-handler.bin"
HANDLER = "/usr/lib/relaunchd/txt-dl-handler.bin"

IMAGES = "/var/lib/relaunchd/images"
CERT = "/etc/relaunchd/test-db.pem"
CONFIG = f"""# written by tests/vm/test_service.py
image_dirs: [{IMAGES}]
trust:
  certificates: [{CERT}]
launch:
  method: kexec
"""


def status(guest, user: str | None = None) -> dict:
    prefix = f"runuser -u {user} -- " if user else ""
    return json.loads(guest.run(f"{prefix}relaunchctl status --json").output)


def test_unit_is_hardened_and_answers_on_the_system_bus(guest):
    guest.run("systemctl start relaunchd")
    assert guest.run("systemctl is-active relaunchd").output.strip() == "active"
    props = status(guest)
    assert props["State"] in ("idle", "failed")
    installed = guest.run("dpkg-query -W -f='${Version}' relaunchd").output
    assert props["Version"].split("-")[0] == installed.split("-")[0]
    exposure = guest.run("systemd-analyze security relaunchd.service --no-pager",
                         check=False).output
    score = float(re.search(r"Overall exposure level for relaunchd\.service: ([\d.]+)",
                            exposure).group(1))
    assert score <= 2.5, exposure


def test_stage_and_cancel_through_the_daemon(guest, vm_image, keys, tmp_path: Path):
    guest.run(f"install -d -m 0755 {IMAGES} /etc/relaunchd")
    guest.put(CERT, keys["db"].cert)
    guest.put("/etc/relaunchd/relaunchd.yaml", CONFIG.encode())
    guest.run("relaunchd --check-config --config /etc/relaunchd/relaunchd.yaml")
    guest.run("systemctl restart relaunchd")
    marker = f"rld.service={uuid.uuid4().hex[:12]}"
    uki = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", ukibuild.OS_RELEASE),
        (".cmdline", f"{vm_image.cmdline} {marker}".encode()),
        (".initrd", vm_image.initrd), (".linux", vm_image.kernel),
    ]), tmp_path / "svc.unsigned.efi")
    guest.put(f"{IMAGES}/svc.efi", ukibuild.sign(uki, keys["db"], tmp_path / "svc.efi"))

    # An unprivileged user reads everything but may not stage (polkit: auth_admin_keep,
    # and no agent to ask).
    assert status(guest, "nobody")["State"] in ("idle", "failed")
    denied = guest.run(f"runuser -u nobody -- relaunchctl stage {IMAGES}/svc.efi",
                       check=False)
    assert denied.rc != 0 and "AccessDenied" in denied.output, denied.output
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "0"

    guest.run(f"relaunchctl stage {IMAGES}/svc.efi", timeout=300)
    props = status(guest)
    assert props["State"] == "staged", props
    assert marker in props["StagedImage"]["cmdline"]
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "1"
    assert guest.run("test -s /run/relaunchd/staged.json", check=False).ok

    guest.run("relaunchctl cancel")
    props = status(guest)
    assert props["State"] == "idle" and not props["StagedImage"]
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "0"
    # leave the guest as the next tests expect it: default configuration
    guest.run("rm -f /etc/relaunchd/relaunchd.yaml && systemctl restart relaunchd")


def test_package_ships_the_dl_handler(guest, relaunchd_deb, tmp_path: Path):
    """The .deb carries the TXT DL handler where `check` and staging look for it,
    byte for byte the one `make setup` built (both builds are reproducible)."""
    out = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", str(relaunchd_deb), str(out)], check=True, timeout=120)
    shipped = (out / HANDLER.lstrip("/")).read_bytes()
    assert shipped == BUILT_HANDLER.read_bytes()
    txt_dl_handler.parse(shipped)
    assert HANDLER in guest.run("dpkg -L relaunchd").output.split()
    installed = guest.run(f"sha256sum {HANDLER}").output.split()[0]
    assert installed == hashlib.sha256(shipped).hexdigest()
