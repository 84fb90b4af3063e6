"""DRTM PCRs 17/18 through tpm2-pytss against a real software TPM (swtpm).

`swtpm_ioctl -h` performs _TPM_Hash_Start/Data/End, which is what a dynamic launch
does to the TPM: PCRs 17-22 are reset to zero and PCR17 is extended with the data's
digest (ecosystem.md §6.4). Before it, PCRs 17/18 are in their reset state (all ones).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from fixtures.platforms.build import materialize
from relaunchd.platform import tpm
from support.swtpm import running_swtpm
from support.tools import require


@pytest.fixture(autouse=True)
def _tools():
    require("swtpm", "swtpm_ioctl")


def test_drtm_pcrs_before_and_after_a_simulated_launch(tmp_path):
    with running_swtpm() as sw:
        before = tpm.read_drtm_pcrs(sw.tcti)
        assert before.ok, before.detail
        assert before.value.bank == "sha256"
        assert before.value.reset_state is True
        assert before.value.values == {17: "ff" * 32, 18: "ff" * 32}

        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{sw.ctrl_port}", "-h", "-"],
                       input=b"relaunchd-mle", check=True, timeout=10)
        after = tpm.read_drtm_pcrs(sw.tcti)
        assert after.ok and after.value.reset_state is False
        expect17 = hashlib.sha256(bytes(32) + hashlib.sha256(b"relaunchd-mle").digest())
        assert after.value.values == {17: expect17.hexdigest(), 18: "00" * 32}

        # The same through the CLI, against a fixture tree with --tpm-tcti.
        root = str(materialize("intel-txt-server", tmp_path))
        p = subprocess.run([sys.executable, "-m", "relaunchd.cli", "check", "--json",
                            "--root", root, "--tpm-tcti", sw.tcti],
                           capture_output=True, text=True, timeout=30)
        fact = json.loads(p.stdout)["facts"]["tpm.drtm_pcrs"]
        assert fact["source"] == f"tcti:{sw.tcti}"
        assert fact["value"]["reset_state"] is False
        assert fact["value"]["pcrs"]["17"] == expect17.hexdigest()


def test_unreachable_tpm_is_unknown_not_a_crash():
    got = tpm.read_drtm_pcrs("swtpm:host=127.0.0.1,port=1")
    assert not got.ok and got.error == "unreadable"
