"""The guest is real: systemd as PID 1, the system bus, polkit, a TPM, and
relaunchd installed from its own Debian package working on a real UKI."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from .deb import REPO

PCR_READ = """python3 - <<'PY'
from tpm2_pytss import ESAPI
with ESAPI("device:/dev/tpmrm0") as esapi:
    _, _, digests = esapi.pcr_read("sha256:0,7")
    for d in digests:
        print(bytes(d).hex())
PY"""


def test_systemd_is_pid1_and_running(guest):
    assert guest.run("readlink /proc/1/exe").output.strip() == "/usr/lib/systemd/systemd"
    state = guest.run("systemctl is-system-running", check=False).output.strip()
    assert state in ("running", "degraded"), guest.run("systemctl --failed", check=False).output
    assert guest.run("systemctl is-active dbus.service").output.strip() == "active"
    # polkitd is bus-activated: a Ping through the system bus starts and reaches it.
    guest.run("busctl call org.freedesktop.PolicyKit1 /org/freedesktop/PolicyKit1/Authority "
              "org.freedesktop.DBus.Peer Ping")


def test_kexec_tools_does_not_act_on_its_own(guest):
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "0"
    assert "LOAD_KEXEC=false" in guest.run("cat /etc/default/kexec").output


def test_relaunchd_installed_from_its_package(guest):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert guest.run("dpkg-query -W -f='${Version}' relaunchd").output == version
    assert guest.run("dpkg -S /usr/bin/relaunchctl").output.startswith("relaunchd:")
    out = guest.run("relaunchctl --version").output
    assert version in out


def test_relaunchctl_inspect_on_a_real_uki(guest, vm_uki):
    guest.run("cmp /srv/rld/minimal.efi /srv/rld/minimal.efi")
    digest = guest.run("sha256sum /srv/rld/minimal.efi").output.split()[0]
    assert digest == hashlib.sha256(vm_uki.read_bytes()).hexdigest()
    out = guest.run("relaunchctl inspect /srv/rld/minimal.efi").output
    assert ".linux" in out


def test_copy_in_over_the_agent(guest, tmp_path: Path):
    data = bytes(range(256)) * 2048 + b"tail"  # > one chunk, every byte value
    guest.put("/root/copied.bin", data, mode=0o600)
    out = guest.run("sha256sum /root/copied.bin; stat -c %a /root/copied.bin").output.split()
    assert out[0] == hashlib.sha256(data).hexdigest()
    assert out[-1] == "600"


def test_command_status_and_output(guest):
    result = guest.run("echo out; echo err >&2; exit 7", check=False)
    assert (result.rc, result.output) == (7, "out\nerr\n")
    slow = guest.run("sleep 30", timeout=2, check=False)
    assert slow.timed_out and not slow.ok


def test_tpm_answers_through_tpm2_pytss(guest):
    assert guest.run("test -c /dev/tpmrm0").ok
    digests = guest.run(PCR_READ).output.split()
    assert len(digests) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    # SeaBIOS measured itself into PCR 0: a live TPM, not an empty one.
    assert digests[0] != "00" * 32
    # Cross-check with an independent client (tpm2-tools).
    tools = guest.run("tpm2_pcrread sha256:0,7").output.lower()
    assert all(d in tools.replace(" ", "") for d in digests) or all(
        f"0x{d}" in tools for d in digests)
