"""The Ansible role on the host, without a target (the relaunch itself is tested against
the guest in tests/vm/test_service_ansible.py): the shipped playbook passes
ansible-playbook's syntax check, the role's relaunchd.yaml renders to a configuration
that relaunchd itself accepts (`relaunchd --check-config`), and bad variables stop the
play at its first task with the role's message, before anything touches the host."""

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


def ansible(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    playbook = BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.fail("ansible-core is not installed: run `make setup`", pytrace=False)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
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
                                 {"relaunchd_next_boot_entry": True}])
def test_bad_variables_stop_the_play_before_anything_runs(tmp_path, bad):
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(bad))
    done = ansible(tmp_path, "-i", "localhost,", "-c", "local", "-e", f"@{extra}",
                   str(PLAYBOOK))
    assert done.returncode != 0
    assert "relaunchd role: relaunchd_install is package|deb|none" in done.stdout
    # Only the facts were gathered; the assertion is the role's first task.
    assert re.search(r"ok=1\s+changed=0\s+unreachable=0\s+failed=1", done.stdout), done.stdout
