"""`relaunchctl check` end to end: fixtures through the CLI, and a read-only host smoke run."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys

import pytest

from fixtures.platforms.build import materialize
from relaunchd.cli import main
from relaunchd.launch import assessment

CLI = [sys.executable, "-m", "relaunchd.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "check", *args], capture_output=True, text=True, timeout=30)


def test_json_shape_and_exit_codes(tmp_path):
    root = str(materialize("intel-laptop-ptt", tmp_path))
    p = _run("--json", "--root", root)
    assert p.returncode == 0, p.stderr          # auto: kexec is ready
    doc = json.loads(p.stdout)
    assert {"methods", "facts"} <= set(doc)
    assert set(doc["methods"]) == {"txt", "skinit", "kexec"}
    txt = doc["methods"]["txt"]
    assert txt["ready"] is False
    assert {r["id"] for r in txt["reasons"]} == {"tpm-crb", "sinit-acm-missing"}
    assert all(set(r) == {"id", "message", "remedy"} for r in txt["reasons"])
    assert doc["facts"]["tpm.driver"] == {"value": "tpm_crb",
                                          "source": "/sys/class/tpm/tpm0/device/driver"}
    assert _run("--json", "--root", root, "--method", "txt").returncode == 1
    assert _run("--root", root, "--method", "kexec").returncode == 0


def test_human_report(tmp_path):
    root = str(materialize("txt-error", tmp_path))
    p = _run("--root", root, "--method", "txt")
    assert p.returncode == 1
    assert "✘ TXT.ESTS.TXT_RESET is set" in p.stdout and "[txt-reset-sticky]" in p.stdout
    assert "→ power the machine off and on" in p.stdout
    assert "✔ CPU has SMX  [cpu-smx]" in p.stdout
    assert "txt: not ready" in p.stdout


def test_usage_errors(tmp_path, capsys):
    assert _run("--method", "warp").returncode == 2
    assert main(["check", "--root", str(tmp_path / "nowhere")]) == 2
    assert "InvalidArgument" in capsys.readouterr().err


def test_options_reach_the_probe(tmp_path):
    root = materialize("amd-epyc-skinit", tmp_path)
    p = _run("--json", "--root", str(root), "--skl", "/boot/skl.bin", "--method", "skinit")
    assert p.returncode == 1
    assert [r["id"] for r in json.loads(p.stdout)["methods"]["skinit"]["reasons"]] == [
        "skinit-no-kernel-support", "skl-missing"]
    root = materialize("intel-txt-server", tmp_path)
    p = _run("--json", "--root", str(root), "--acm-dir", "/nowhere", "--method", "txt")
    assert [r["id"] for r in json.loads(p.stdout)["methods"]["txt"]["reasons"]] == [
        "sinit-acm-missing"]


def _host_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return flag in line.split()
    return False


def test_host_smoke_reads_only_and_never_devmem(monkeypatch, capsys):
    """`check --root /` on this machine: no crash, sensible verdicts, and no /dev/mem or MSR
    access when the CPU has no SMX (every os.open and open() of the process is recorded)."""
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, flags, *a, **k):
        opened.append(os.fsdecode(path))
        assert not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC), path
        return real_os_open(path, flags, *a, **k)

    def spy_open(file, mode="r", *a, **k):
        if isinstance(file, str | bytes | os.PathLike):
            opened.append(os.fsdecode(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    code = main(["check", "--json", "--root", "/"])
    monkeypatch.undo()
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    assert code == (0 if any(m["ready"] for m in doc["methods"].values()) else 1)
    if not _host_has("smx"):
        assert not [p for p in opened if p.startswith(("/dev/mem", "/dev/cpu"))], opened
        assert doc["methods"]["txt"]["ready"] is False
    if not os.path.exists("/sys/kernel/kexec_loaded"):      # this host: no kexec in the kernel
        ids = {r["id"] for r in doc["methods"]["kexec"]["reasons"]}
        assert "kexec-unsupported" in ids
        assert doc["methods"]["kexec"]["ready"] is False
    for name, fact in doc["facts"].items():
        assert fact["source"], name


def test_host_probe_is_deterministic():
    a, b = assessment.assess(), assessment.assess()
    assert {m: v.ready for m, v in a.verdicts.items()} == {
        m: v.ready for m, v in b.verdicts.items()}


@pytest.mark.parametrize("method", ["txt", "skinit", "kexec"])
def test_method_exit_code_matches_json(method, tmp_path):
    root = str(materialize("amd-epyc-skinit", tmp_path))
    p = _run("--json", "--root", root, "--method", method)
    assert p.returncode == (0 if json.loads(p.stdout)["methods"][method]["ready"] else 1)


def test_txt_ready_with_the_shipped_dl_handler(tmp_path):
    root = materialize("intel-txt-server", tmp_path)
    p = _run("--json", "--root", str(root), "--method", "txt")
    assert p.returncode == 0, p.stdout
    checks = {c["id"]: c["ok"] for c in json.loads(p.stdout)["methods"]["txt"]["checks"]}
    assert checks["dl-handler"] is True and "dl-handler-missing" not in checks
