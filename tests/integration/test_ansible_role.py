"""The Ansible role on the host, without a target (the relaunch itself is tested against
the guest in tests/vm/test_service_ansible.py): the shipped playbook passes
ansible-playbook's syntax check, the role's relaunchd.yaml renders to a configuration
that relaunchd itself accepts (`relaunchd --check-config`), bad variables stop the
play at its first task with the role's message, before anything touches the host, the
relaunch task asks relaunchd for the configured fallback, and the verification judges
each LastRelaunch a new boot can report (verified, not verified, relaunchd's own
firmware reboot, another restart) against a scripted `relaunchctl status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.ukibuild import make_signing_key

TOP = Path(__file__).resolve().parents[2]
ROLE = TOP / "contrib" / "ansible" / "roles" / "relaunchd"
PLAYBOOK = TOP / "contrib" / "ansible" / "examples" / "relaunch.yml"
BIN = Path(sys.executable).parent


def ansible(tmp_path: Path, *args: str, path: str = "") -> subprocess.CompletedProcess:
    playbook = BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.fail("ansible-core is not installed: run `make setup`", pytrace=False)
    env = {"PATH": f"{path}{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "t"),
           "ANSIBLE_ROLES_PATH": str(ROLE.parent), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run([str(playbook), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)


def test_example_playbook_passes_the_syntax_check(tmp_path):
    done = ansible(tmp_path, "-i", "localhost,", "--syntax-check", str(PLAYBOOK))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rendered_configuration_is_one_relaunchd_accepts(tmp_path):
    # --check-config reads every trust.certificates file as staging does: the rendered
    # path must hold a real certificate (where the role would have copied it).
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir(mode=0o755)
    cert = make_signing_key(trust_dir, "fleet-db", "fleet db").cert
    out = tmp_path / "relaunchd.yaml"
    variables = {"relaunchd_trust_certificates": [str(cert)], "relaunchd_method": "kexec",
                 "relaunchd_trust_dir": str(trust_dir),
                 "relaunchd_unbind_devices": ["0000:00:05.0"],
                 "relaunchd_extra_config": {"measurement": {"pcr": 16}}}
    play = tmp_path / "render.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml")],
        "tasks": [{"ansible.builtin.template": {
            "src": str(ROLE / "templates" / "relaunchd.yaml.j2"), "dest": str(out)}}],
    }]))
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(variables))
    done = ansible(tmp_path, "-i", "localhost,", "-e", f"@{extra}", str(play))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(out.read_text())
    assert config["trust"]["certificates"] == [str(trust_dir / "fleet-db.crt")]
    assert config["launch"] == {"method": "kexec", "require_drtm": False}
    assert config["quiesce"]["unbind_devices"] == ["0000:00:05.0"]
    assert config["measurement"] == {"pcr": 16}
    assert config["image_dirs"][0] == "/var/lib/relaunchd/images"
    check = subprocess.run([sys.executable, "-m", "relaunchd.daemon", "--check-config",
                            "--config", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("bad", [{"relaunchd_fallback": "maybe"},
                                 {"relaunchd_method": "warp"},
                                 {"relaunchd_install": "deb"},
                                 {"relaunchd_next_boot_entry": True,
                                  "relaunchd_image": "/var/lib/relaunchd/images/a.efi"}])
def test_bad_variables_stop_the_play_before_anything_runs(tmp_path, bad):
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(bad))
    done = ansible(tmp_path, "-i", "localhost,", "-c", "local", "-e", f"@{extra}",
                   str(PLAYBOOK))
    assert done.returncode != 0
    assert "relaunchd role: relaunchd_install is package|deb|none" in done.stdout
    # Only the facts were gathered; the assertion is the role's first task.
    assert re.search(r"ok=1\s+changed=0\s+unreachable=0\s+failed=1", done.stdout), done.stdout


def test_the_relaunch_asks_relaunchd_for_the_configured_fallback():
    tasks = yaml.safe_load((ROLE / "tasks" / "relaunch.yml").read_text())
    reboot = next(t["ansible.builtin.reboot"] for t in tasks if "ansible.builtin.reboot" in t)
    assert reboot["reboot_command"] == \
        "relaunchctl relaunch --wait --fallback {{ relaunchd_fallback }}"
    assert "systemctl reboot" not in (ROLE / "tasks" / "relaunch.yml").read_text()


RELAUNCH_ID = "6f9d2a51-0000-4000-8000-000000000001"
FALLBACK = {"id": RELAUNCH_ID, "method": "firmware-reboot", "handoff": "reboot",
            "verified": False, "fallback": {"reason": "NotStaged: nothing is staged"},
            "mismatches": ["no relaunch: relaunchd fell back to a firmware reboot "
                           "(NotStaged: nothing is staged)"]}
VERIFIED = {"id": RELAUNCH_ID, "method": "kexec", "verified": True, "mismatches": [],
            "downtime_ms": 4321}
NOT_VERIFIED = {"id": RELAUNCH_ID, "method": "kexec", "verified": False,
                "mismatches": ["/proc/cmdline is 'x', the staged command line is 'y'"]}
OTHER = {"id": "another", "method": "kexec", "verified": True, "mismatches": []}


def run_role_tasks(tmp_path: Path, tasks: str, relaunchctl: str, variables: dict,
                   extra_tasks: tuple = ()) -> subprocess.CompletedProcess:
    """One of the role's task files on localhost, with `relaunchctl` the shell script
    `relaunchctl` (first on PATH) and `variables` as extra variables."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "relaunchctl").write_text(f"#!/bin/sh\n{relaunchctl}")
    (fake / "relaunchctl").chmod(0o755)
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml")],
        "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / tasks)},
                  *extra_tasks],
    }]))
    # Extra variables, as a playbook's own would win over the role's defaults (in a play,
    # vars_files would win over play vars).
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({"ansible_python_interpreter": sys.executable, **variables}))
    return ansible(tmp_path, "-i", "localhost,", "-e", f"@{extra}", str(play),
                   path=f"{fake}:")


def verify(tmp_path: Path, last: dict, **variables) -> subprocess.CompletedProcess:
    """The role's verify.yml, with `relaunchctl status --json` answering `last` as the
    new boot's LastRelaunch."""
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"State": "idle", "LastRelaunch": last}))
    return run_role_tasks(tmp_path, "verify.yml",
                          f'[ "$*" = "status --json" ] || exit 64\ncat {status}\n',
                          {"relaunchd_relaunch_id": RELAUNCH_ID, **variables})


@pytest.mark.parametrize("last, variables, ok, says", [
    (FALLBACK, {"relaunchd_fallback": "reboot"}, True,
     "relaunchd rebooted the host through firmware instead"),
    (FALLBACK, {"relaunchd_fallback": "reboot", "relaunchd_require_relaunch": True}, False,
     "relaunchd_require_relaunch is true"),
    (FALLBACK, {"relaunchd_fallback": "none"}, False, "did not happen: firmware reboot"),
    (VERIFIED, {}, True, "verified, downtime 4321 ms"),
    (NOT_VERIFIED, {}, False, "NOT verified: /proc/cmdline is"),
    (NOT_VERIFIED, {"relaunchd_require_verified": False}, True, "NOT verified, downtime"),
    (OTHER, {"relaunchd_fallback": "none"}, False, "came back without relaunch"),
    (OTHER, {"relaunchd_fallback": "reboot"}, True, "the host restarted"),
])
def test_verification_judges_each_last_relaunch(tmp_path, last, variables, ok, says):
    done = verify(tmp_path, last, **variables)
    out = " ".join(done.stdout.split())
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    assert says in out, done.stdout
    if last is FALLBACK:
        assert "NotStaged: nothing is staged" in out


@pytest.mark.parametrize("variables, argv", [
    ({"relaunchd_next_boot_entry": True}, "stage --json --next-boot"),
    ({"relaunchd_image": "/var/lib/relaunchd/images/new.efi"},
     "stage --json /var/lib/relaunchd/images/new.efi"),
])
def test_the_role_stages_an_image_or_the_next_boot_entry(tmp_path, variables, argv):
    """relaunch.yml on localhost against a `relaunchctl` that records its arguments and
    answers as `stage --json` does; the relaunch itself is left out (relaunchd_relaunch
    false) — the guest test does that part."""
    calls = tmp_path / "calls"
    done = run_role_tasks(
        tmp_path, "relaunch.yml",
        f'echo "$*" >> {calls}\necho \'{{"id": "{RELAUNCH_ID}"}}\'\n',
        {"relaunchd_relaunch": False, **variables},
        ({"ansible.builtin.debug": {"msg": "id={{ relaunchd_relaunch_id }}"}},))
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls.read_text().splitlines() == [argv]
    assert f"id={RELAUNCH_ID}" in done.stdout
