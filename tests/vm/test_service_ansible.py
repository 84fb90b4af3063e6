"""The Ansible role (contrib/ansible/roles/relaunchd), tested for real: ansible-core runs
the shipped example playbook against the guest over SSH — QEMU user networking with
restrict=on, port 22 forwarded from 127.0.0.1 only, a key made for this run and put in
by the agent (never in the cached image), the guest's own host key pinned. The role
installs relaunchd from its .deb, configures trust, copies and stages a UKI, relaunches
through `ansible.builtin.reboot` with `relaunchctl relaunch --wait` as reboot_command,
and reads the new boot's LastRelaunch:

1. a good image: the play succeeds and the guest runs it, verified;
2. an image whose kernel never reaches userspace (the guest falls back through
   firmware, a new boot id all the same): the relaunch is not verified and the role
   fails the host with the mismatches.

Runs after test_service (file order); test_service_luks and test_service_relaunch
configure relaunchd themselves afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .guestuki import guest_uki

TOP = Path(__file__).resolve().parents[2]
ROLES = TOP / "contrib" / "ansible" / "roles"
PLAYBOOK = TOP / "contrib" / "ansible" / "examples" / "relaunch.yml"
PLAY_TIMEOUT = 1500
# As in test_service_relaunch: PID 1 exits, the kernel panics, panic=1 resets the
# machine and SeaBIOS boots the guest's normal kernel again.
FAILING_INIT = b"#!/bin/sh\necho rld-failing-kernel: giving up\nexit 1\n"


@pytest.fixture(scope="module")
def ansible_env(guest, tmp_path_factory) -> dict:
    """An SSH key for this run only, authorised for root in the guest, the guest's host
    key pinned, an inventory, and an Ansible home inside the run's temporary dir."""
    ansible = Path(os.environ.get("VIRTUAL_ENV", TOP / ".venv")) / "bin" / "ansible-playbook"
    if not ansible.exists():
        ansible = TOP / ".venv" / "bin" / "ansible-playbook"
    assert ansible.exists(), "ansible-core is not installed: run `make setup`"
    work = tmp_path_factory.mktemp("ansible")
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "relaunchd-vm-test",
                    "-f", str(key)], check=True, timeout=30)
    guest.run("install -d -m 0700 /root/.ssh")
    guest.put("/root/.ssh/authorized_keys", (work / "id_ed25519.pub").read_bytes(), mode=0o600)
    port = guest.spec.ssh_port
    host_key = guest.run("cat /etc/ssh/ssh_host_ed25519_key.pub").output.split()[:2]
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    (work / "inventory").write_text(
        f"guest ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
        f"ansible_ssh_private_key_file={key} ansible_python_interpreter=/usr/bin/python3 "
        f"ansible_ssh_common_args='-o UserKnownHostsFile={work / 'known_hosts'} "
        "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes'\n")
    env = {"PATH": f"{ansible.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": str(work), "ANSIBLE_HOME": str(work / "home"),
           "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "ANSIBLE_ROLES_PATH": str(ROLES),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_PIPELINING": "1"}
    yield {"bin": ansible, "work": work, "env": env}
    guest.run("rm -f /root/.ssh/authorized_keys", check=False)


def play(ansible_env, **variables) -> subprocess.CompletedProcess:
    extra = ansible_env["work"] / f"vars-{uuid.uuid4().hex[:8]}.json"
    extra.write_text(json.dumps(variables))
    return subprocess.run(
        [str(ansible_env["bin"]), "-i", str(ansible_env["work"] / "inventory"),
         "-e", f"@{extra}", str(PLAYBOOK)],
        capture_output=True, text=True, timeout=PLAY_TIMEOUT, env=ansible_env["env"],
        cwd=ansible_env["work"])


def recap(output: str) -> dict[str, int]:
    line = re.search(r"^guest\s+:\s+(.*)$", output, re.M)
    assert line, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.group(1))}


def base_vars(relaunchd_deb, keys) -> dict:
    return {"relaunchd_install": "deb", "relaunchd_deb_src": str(relaunchd_deb),
            "relaunchd_trust_certificates": [str(keys["db"].cert)],
            "relaunchd_method": "kexec", "relaunchd_reboot_timeout": 900}


def test_role_relaunches_and_requires_a_verified_relaunch(guest, ansible_env, relaunchd_deb,
                                                           vm_image, keys, tmp_path,
                                                           vm_timings):
    marker = f"rld.ansible={uuid.uuid4().hex[:12]}"
    image = guest_uki(vm_image, keys, tmp_path, marker, "ansible-next")
    old_boot = guest.boot_id()
    since = time.monotonic()
    done = play(ansible_env, **base_vars(relaunchd_deb, keys),
                relaunchd_image_src=str(image))
    vm_timings.add("ansible_play_verified", time.monotonic() - since)
    counts = recap(done.stdout)
    assert done.returncode == 0 and counts["failed"] == 0, done.stdout[-4000:]
    assert counts["unreachable"] == 0
    assert re.search(r"relaunch [0-9a-f-]+ verified, downtime \d+ ms", done.stdout)
    guest.wait_ready(300, since=since, not_boot_id=old_boot)
    last = json.loads(guest.run("relaunchctl status --json").output)["LastRelaunch"]
    assert last["verified"] is True and last["previous_boot_id"] == old_boot, last
    assert marker in guest.run("cat /proc/cmdline").output.split()
    config = guest.run("cat /etc/relaunchd/relaunchd.yaml").output
    assert f"/etc/relaunchd/trust/{keys['db'].cert.name}" in config
    assert "method: kexec" in config


def test_role_fails_the_host_when_the_relaunch_is_not_verified(guest, ansible_env,
                                                               relaunchd_deb, vm_image, keys,
                                                               tmp_path):
    image = guest_uki(vm_image, keys, tmp_path, f"rld.ansible-bad={uuid.uuid4().hex[:8]}",
                      "ansible-broken", rdinit=FAILING_INIT, extra_cmdline="panic=1")
    old_boot = guest.boot_id()
    since = time.monotonic()
    done = play(ansible_env, **base_vars(relaunchd_deb, keys),
                relaunchd_image_src=str(image))
    counts = recap(done.stdout)
    assert done.returncode != 0 and counts["failed"] == 1, done.stdout[-4000:]
    assert counts["unreachable"] == 0
    failure = re.search(r"relaunch ([0-9a-f-]+) NOT verified: (.*)", done.stdout)
    assert failure, done.stdout[-4000:]
    assert "/proc/cmdline is" in failure.group(2)
    assert "the TPM was reset since the hand-off" in failure.group(2)
    guest.wait_ready(300, since=since, not_boot_id=old_boot)
    last = json.loads(guest.run("relaunchctl status --json").output)["LastRelaunch"]
    assert last["id"] == failure.group(1) and last["verified"] is False
