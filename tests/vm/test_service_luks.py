"""Sealed volumes, proven by a real relaunch (issue 17): two LUKS2 data volumes on the
guest's extra virtio disks, enrolled by systemd 252's `systemd-cryptenroll
--tpm2-device=auto` on the guest's swtpm — one against PCR 7, one against PCRs 7+15
with PCR 15 extended afterwards at runtime (as systemd-pcrfs or a volume-key
measurement would). `relaunchctl check --json` predicts which unlocks; after a real
relaunch through the service, `systemd-cryptsetup attach` with the TPM token opens the
first and not the second, exactly as predicted.

The relaunch runs `relaunchctl relaunch --wait` attached: its exit status and output
are the kured/Ansible contract (0, "the system is going down").

Runs after test_service_ansible and before test_service_relaunch (file order), which
configure relaunchd themselves."""

from __future__ import annotations

import json
import uuid

from .guestsetup import IMAGES, configure
from .guestuki import guest_uki

CERT = "/etc/relaunchd/test-db.pem"
KEYFILE = "/root/luks-test.key"
VOLUMES = {"sealed7": "rldluks1", "sealed7and15": "rldluks2"}
KEXEC_TIMEOUT = 600


def device(serial: str) -> str:
    return f"/dev/disk/by-id/virtio-{serial}"


def attach(guest, name: str) -> tuple[bool, str]:
    """systemd-cryptsetup with the TPM token only (headless: never ask for a passphrase)."""
    done = guest.run(f"/lib/systemd/systemd-cryptsetup attach {name} "
                     f"{device(VOLUMES[name])} none tpm2-device=auto,headless=true",
                     timeout=120, check=False)
    opened = guest.run(f"test -b /dev/mapper/{name}", check=False).ok
    if opened:
        guest.run(f"/lib/systemd/systemd-cryptsetup detach {name}")
    return opened and done.ok, done.output


def pcr(guest, index: int) -> str:
    return guest.run(f"tpm2_pcrread -Q -o /dev/stdout sha256:{index} | od -An -tx1 -v | "
                     "tr -d ' \\n'").output.strip()


def test_sealed_volumes_predicted_then_proven_by_a_relaunch(guest, vm_image, keys, tmp_path,
                                                            vm_timings):
    configure(guest, cert=keys["db"].cert, cert_path=CERT,
              written_by="tests/vm/test_service_luks.py")
    # A BIOS boot of vmlinuz, as Debian 12 usually boots: no systemd-stub, so systemd
    # 252's pcrphase units skip (ConditionPathExists=StubPcrKernelImage) and nothing
    # extends PCR 11 on the way down; the prediction below relies on that.
    assert not guest.run("test -e /sys/firmware/efi", check=False).ok
    for unit in ("systemd-pcrphase.service", "systemd-pcrphase-sysinit.service"):
        shown = guest.run(f"systemctl show -p ConditionResult -p ActiveState {unit}").output
        assert "ConditionResult=no" in shown and "ActiveState=inactive" in shown, shown
    # Text, no newline: systemd-cryptenroll gets it through $PASSWORD, where a random
    # NUL or trailing newline would be lost and the passphrase would not match.
    guest.run(f"umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {KEYFILE}")
    for serial in VOLUMES.values():
        guest.run(f"cryptsetup luksFormat --type luks2 --batch-mode --pbkdf pbkdf2 "
                  f"--pbkdf-force-iterations 1000 --key-file {KEYFILE} {device(serial)}",
                  timeout=120)
    # systemd-cryptenroll takes the unlocking passphrase from $PASSWORD.
    enroll = f'PASSWORD="$(cat {KEYFILE})" systemd-cryptenroll --tpm2-device=auto'
    guest.run(f"{enroll} --tpm2-pcrs=7 {device(VOLUMES['sealed7'])}", timeout=120)
    guest.run(f"{enroll} --tpm2-pcrs=7+15 {device(VOLUMES['sealed7and15'])}", timeout=120)
    pcr15_enrolled = pcr(guest, 15)
    guest.run("tpm2_pcrextend 15:sha256=$(echo -n runtime | sha256sum | cut -d' ' -f1)")
    assert pcr(guest, 15) != pcr15_enrolled
    guest.put("/etc/crypttab", "".join(
        f"{name} {device(serial)} none luks,noauto,tpm2-device=auto,headless=true\n"
        for name, serial in VOLUMES.items()).encode())

    try:
        check = json.loads(guest.run("relaunchctl check --json", check=False).output)
        volumes = {v["name"]: v for v in check["volumes"]}
        assert volumes["sealed7"]["unlocks_after_relaunch"] is True, volumes
        assert volumes["sealed7"]["pcrs"] == [7] and volumes["sealed7"]["stale_pcrs"] == []
        assert volumes["sealed7and15"]["unlocks_after_relaunch"] is False, volumes
        assert volumes["sealed7and15"]["pcrs"] == [7, 15]
        assert "does not hold even now" in volumes["sealed7and15"]["reason"]
        assert volumes["sealed7and15"]["remedy"]
        # The prediction is about the TPM token, not the passphrase slot.
        assert volumes["sealed7"]["tokens"][0]["pcr_source"] == "tcti:device:/dev/tpmrm0"
        human = guest.run("relaunchctl check", check=False).output
        assert "sealed7and15" in human and "DOES NOT UNLOCK" in human

        marker = f"rld.luks={uuid.uuid4().hex[:12]}"
        guest.put(f"{IMAGES}/luks.efi", guest_uki(vm_image, keys, tmp_path, marker, "luks"))
        staged = json.loads(guest.run(f"relaunchctl stage --json {IMAGES}/luks.efi",
                                      timeout=300).output)
        pcr7_before = pcr(guest, 7)
        # launch.sealed_volumes: block (the default) refuses, naming the volume that would
        # ask for a passphrase and only that one; Capabilities carries the prediction.
        refused = guest.run("relaunchctl relaunch --wait", check=False)
        assert refused.rc == 1, refused.output
        assert "would not unlock after the relaunch: sealed7and15 (" in refused.output
        assert "sealed7 (" not in refused.output
        caps = json.loads(guest.run("relaunchctl status --json").output)["Capabilities"]
        assert {v["name"]: v["unlocks_after_relaunch"] for v in caps["volumes"]} == {
            "sealed7": True, "sealed7and15": False}
        # Forced: the relaunch goes through and the prediction is put to the test.
        result, boot = guest.transition_attached("relaunchctl relaunch --wait --force",
                                                 timeout=KEXEC_TIMEOUT)
        vm_timings.add("relaunch_attached_to_ready", boot.seconds)
        assert result.rc == 0, result.output
        assert result.output == f"relaunch {staged['id']}: the system is going down\n"
        last = json.loads(guest.run("relaunchctl status --json").output)["LastRelaunch"]
        assert last["id"] == staged["id"] and last["verified"] is True, last
        assert marker in guest.run("cat /proc/cmdline").output.split()

        # Exactly as predicted: nothing reset PCR 7 or PCR 15.
        assert pcr(guest, 7) == pcr7_before
        opened, output = attach(guest, "sealed7")
        assert opened, output
        opened, output = attach(guest, "sealed7and15")
        assert not opened, output
    finally:
        guest.run("rm -f /etc/crypttab", check=False)
