"""packaging/completion/relaunchctl, run in a real bash with COMP_WORDS set as
readline would set them, and checked against the argparse parser so the
completion cannot drift from the commands and options that exist."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from relaunchd.cli import build_parser

TOP = Path(__file__).resolve().parents[3]
SCRIPT = TOP / "packaging" / "completion" / "relaunchctl"
BASH = shutil.which("bash") or "/bin/bash"

DRIVER = r"""
source "$1"; shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
_relaunchctl relaunchctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete(*words: str, cwd: Path | None = None) -> list[str]:
    """COMPREPLY for the command line `words` (the last one is being completed)."""
    result = subprocess.run([BASH, "--norc", "--noprofile", "-c", DRIVER, "bash", str(SCRIPT),
                             "relaunchctl", *words],
                            capture_output=True, text=True, timeout=30, cwd=cwd or TOP)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("relaunchctl has no subcommands")


def test_script_parses_and_registers():
    result = subprocess.run([BASH, "--norc", "--noprofile", "-c",
                             'source "$1" && complete -p relaunchctl', "bash", str(SCRIPT)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "-F _relaunchctl relaunchctl" in result.stdout


@pytest.mark.parametrize(("words", "expected"), [
    (("st",), ["stage", "status"]),
    (("stage", "--lo"), ["--loader", "--local"]),
    (("stage", "--loader", ""), ["file", "segments"]),
    (("stage", "--method", ""), ["kexec", "skinit", "txt"]),
    (("stage", "--method", "=", ""), ["kexec", "skinit", "txt"]),
    (("check", "--method", ""), ["auto", "kexec", "skinit", "txt"]),
    (("inspect", "--bank", "sha2"), ["sha256"]),
    (("relaunch", "--"), ["--fallback", "--force", "--help", "--immediate", "--json",
                          "--rehearse", "--wait"]),
    (("relaunch", "--fallback", ""), ["none", "reboot"]),
    (("history", "--l"), ["--limit"]),
    (("--v",), ["--version"]),
    (("stage", "--profile", ""), []),
])
def test_cases(words, expected):
    assert complete(*words) == expected


def test_every_command_is_offered():
    assert complete("") == sorted(subcommands())


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_options_match_the_parser(command):
    parser = subcommands()[command]
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert set(complete(command, "-")) == options


def test_files_for_image_cert_and_output(tmp_path):
    (tmp_path / "new.efi").write_bytes(b"")
    (tmp_path / "db.pem").write_bytes(b"")
    (tmp_path / "plans").mkdir()
    assert complete("stage", "n", cwd=tmp_path) == ["new.efi"]
    assert complete("inspect", "--json", "", cwd=tmp_path) == ["db.pem", "new.efi", "plans"]
    assert complete("verify", "--cert", "d", cwd=tmp_path) == ["db.pem"]
    assert complete("stage", "--output", "", cwd=tmp_path) == ["plans"]
    assert complete("stage", "--dry-run", "--output", "=", "p", cwd=tmp_path) == ["plans"]
    # Commands without an IMAGE argument offer options, not files.
    assert complete("status", "", cwd=tmp_path) == ["--help", "--json", "-h"]
