"""The man pages render cleanly and cannot drift from the code: every relaunchctl
command and long option, every relaunchd option and every top-level key of the
documented default configuration must appear in the page that describes it."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from relaunchd import daemon
from relaunchd.cli import COMMANDS, build_parser
from support.tools import require

TOP = Path(__file__).resolve().parents[2]
MAN = TOP / "docs" / "man"
PAGES = ("relaunchctl.1", "relaunchd.8", "relaunchd.yaml.5")


def page_text(name: str) -> str:
    """The roff source with `\\-` unescaped, so options read as typed."""
    return (MAN / name).read_text(encoding="utf-8").replace("\\-", "-")


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--")}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_warnings(name):
    groff = shutil.which("groff")
    assert groff, "groff is missing (groff-base, .ci/host-packages.txt)"
    result = subprocess.run([groff, "-man", "-ww", "-z", str(MAN / name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_with_man_without_warnings(name):
    require("man")
    man = shutil.which("man")
    result = subprocess.run([man, "--warnings", "-l", str(MAN / name)],
                            capture_output=True, text=True, timeout=60,
                            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_every_relaunchctl_command_and_option_is_documented():
    text = page_text("relaunchctl.1")
    parser = build_parser()
    commands = subcommands(parser)
    # A command module that fails to import would silently shrink the parser.
    assert set(COMMANDS) <= set(commands)
    missing = []
    for option in long_options(parser):
        if option not in text:
            missing.append(option)
    for name, sub in commands.items():
        if not re.search(rf"^\.SS {re.escape(name)}$", text, re.M):
            missing.append(f"section for {name}")
        if f"relaunchctl {name}" not in text:
            missing.append(f"synopsis of {name}")
        section = text.split(f"\n.SS {name}\n", 1)[-1].split("\n.S", 1)[0]
        synopsis = text.split("\n.SH DESCRIPTION", 1)[0]
        for option in long_options(sub) - {"--help"}:
            if option not in section and option not in synopsis:
                missing.append(f"{name} {option}")
            if not re.search(rf"{re.escape(option)}(?![-\w])", text):
                missing.append(f"{name} {option} (anywhere)")
    assert not missing, f"relaunchctl.1 does not document: {missing}"


def test_every_relaunchd_option_is_documented():
    text = page_text("relaunchd.8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        daemon.main(["--help"])
    options = set(re.findall(r"--[a-z][a-z-]*", out.getvalue()))
    assert {"--config", "--check-config"} <= options
    missing = sorted(o for o in options if o not in text)
    assert not missing, f"relaunchd.8 does not document: {missing}"


def test_every_config_key_is_documented():
    text = page_text("relaunchd.yaml.5")
    defaults = yaml.safe_load((TOP / "conf" / "relaunchd.yaml").read_text(encoding="utf-8"))
    keys = list(defaults)
    for value in defaults.values():
        if isinstance(value, dict):
            keys.extend(value)
    missing = [k for k in keys
               if not re.search(rf"^\.BR? {re.escape(k)}(\s|$)", text, re.M)]
    assert not missing, f"relaunchd.yaml.5 does not document: {missing}"


def test_pages_cross_reference_each_other():
    for name in PAGES:
        text = page_text(name)
        assert ".SH SEE ALSO" in text
        others = [p for p in PAGES if p != name]
        for other in others:
            stem, section = other.rsplit(".", 1)
            assert f".BR {stem} ({section})" in text, f"{name} does not refer to {other}"


# --- packaging/rpm/relaunchd.spec (rpmspec from Debian's `rpm`, .ci/host-packages.txt) --

SPEC = TOP / "packaging" / "rpm" / "relaunchd.spec"
FEDORA_REQUIRES = {"python3-pydbus", "python3-systemd", "python3-pefile", "python3-tpm2-pytss",
                   "python3-pyyaml", "python3-psutil", "python3-cryptography",
                   "python3-asn1crypto"}


def rpmspec(*args: str) -> str:
    tool = shutil.which("rpmspec")
    assert tool, "rpmspec is missing (Debian package rpm, .ci/host-packages.txt)"
    result = subprocess.run([tool, *args, str(SPEC)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def test_rpm_spec_parses():
    parsed = rpmspec("-P")
    for section in ("%build", "%install", "%post", "%preun", "%postun", "%files"):
        assert re.search(rf"^{section}\b", parsed, re.M), section
    assert "%pyproject_wheel" in parsed and "%pyproject_install" in parsed
    assert "%systemd_post relaunchd.service" in parsed


def test_rpm_spec_version_and_requires():
    project = tomllib.loads((TOP / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert rpmspec("-q", "--qf", "%{version}\n").split() == [project["version"]]
    requires = set(rpmspec("-q", "--requires").split())
    assert requires >= FEDORA_REQUIRES, FEDORA_REQUIRES - requires
    # One Fedora name per pyproject dependency.
    assert len(FEDORA_REQUIRES) == len(project["dependencies"])


def test_rpm_spec_installs_every_shipped_file():
    text = SPEC.read_text(encoding="utf-8")
    shipped = [p for d in ("units", "conf", "docs/man", "packaging/completion")
               for p in sorted((TOP / d).rglob("*")) if p.is_file()]
    missing = [str(p.relative_to(TOP)) for p in shipped
               if f" {p.relative_to(TOP)} " not in text]
    assert not missing, f"relaunchd.spec does not install: {missing}"


def test_every_test_the_docs_name_exists():
    """The docs say how each claim is tested by naming test files and test functions;
    a moved or renamed test must not leave them pointing at nothing."""
    docs = [TOP / "README.md", *sorted((TOP / "docs").glob("*.md")),
            TOP / "contrib/ansible/roles/relaunchd/README.md"]
    missing = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for path, function in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text):
            target = TOP / path
            if not target.exists():
                missing.append(f"{doc.name}: {path}")
            elif function and not re.search(rf"def {function}\b", target.read_text()):
                missing.append(f"{doc.name}: {path}::{function}")
    assert missing == []
