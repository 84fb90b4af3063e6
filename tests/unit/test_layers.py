"""The layer contract can fail: import-linter with the repository's own contracts
(pyproject.toml `[tool.importlinter]`, run by `make lint`) against a copy of the package
into which one forbidden import is written, and the `formats` layer's purity (bytes and
descriptors in, values out) checked on the syntax tree of every module.

The copy is analysed, not the checkout: lint-imports runs in the copy's directory with
it first on PYTHONPATH (the editable install's .pth entry comes after PYTHONPATH), and
`test_the_copy_is_what_gets_analysed` proves it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "daemon" / "relaunchd"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACTS = ("layers", "dbus-in-bus-only", "config-is-a-leaf")


@dataclass(frozen=True)
class Copy:
    top: Path

    @property
    def package(self) -> Path:
        return self.top / "relaunchd"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(self.top), PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONSTARTUP", None)
        return env

    def add_import(self, module: str, line: str) -> None:
        """Append `line` at module level: a real import statement, as a developer would
        write it (after the module's own imports is not needed for the graph)."""
        path = self.package / module
        path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")

    def lint(self, *contracts: str) -> subprocess.CompletedProcess:
        args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
        for contract in contracts:
            args += ["--contract", contract]
        return subprocess.run(args, cwd=self.top, env=self.env(), capture_output=True,
                              text=True, timeout=120)


@pytest.fixture
def copy(tmp_path) -> Copy:
    top = tmp_path / "tree"
    top.mkdir()
    shutil.copytree(PACKAGE, top / "relaunchd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The contracts exactly as the repository has them (lint-imports reads pyproject.toml
    # in its working directory).
    shutil.copy(REPO / "pyproject.toml", top / "pyproject.toml")
    return Copy(top)


def test_the_contracts_under_test_are_the_repositorys(copy):
    text = (copy.top / "pyproject.toml").read_text()
    for contract in CONTRACTS:
        assert f'id = "{contract}"' in text, contract


def test_the_copy_is_what_gets_analysed(copy):
    out = subprocess.run([sys.executable, "-c", "import relaunchd; print(relaunchd.__file__)"],
                         cwd=copy.top, env=copy.env(), capture_output=True, text=True,
                         timeout=60, check=True)
    assert Path(out.stdout.strip()) == copy.package / "__init__.py"


def test_the_unmodified_copy_keeps_every_contract(copy):
    result = copy.lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_a_downward_import_is_allowed(copy):
    """The check is not a change detector: an import that points down passes."""
    copy.add_import("engine/catalogue.py", "from relaunchd.formats import pe")
    copy.add_import("launch/kexec.py", "from relaunchd.platform import sysroot")
    result = copy.lint()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line", "contract", "named"), [
    # formats must import nothing above it (issue #16's example)
    ("formats/pe.py", "from relaunchd.engine import core", "layers",
     "relaunchd.formats.pe -> relaunchd.engine.core"),
    # platform reaching up into a launch method
    ("platform/readiness.py", "from relaunchd.launch import txt", "layers",
     "relaunchd.platform.readiness -> relaunchd.launch.txt"),
    # the engine importing an adapter
    ("engine/core.py", "import relaunchd.prometheus", "layers",
     "relaunchd.engine.core -> relaunchd.prometheus"),
    # D-Bus outside the bus adapter
    ("engine/relaunch.py", "from gi.repository import GLib", "dbus-in-bus-only",
     "relaunchd.engine.relaunch -> gi"),
    ("cli/status.py", "import pydbus", "dbus-in-bus-only", "relaunchd.cli.status -> pydbus"),
    # the configuration pulling in staging
    ("engine/config.py", "from relaunchd.launch import staging", "config-is-a-leaf",
     "relaunchd.engine.config -> relaunchd.launch.staging"),
])
def test_an_added_import_breaks_its_contract_and_is_named(copy, module, line, contract, named):
    copy.add_import(module, line)
    result = copy.lint(contract)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert named in result.stdout, result.stdout
    # The other contracts do not hide it or take the blame: only this one breaks, and
    # `make lint` (every contract) fails too.
    assert copy.lint().returncode != 0


# ------------------------------------------------------------------ formats purity

FORBIDDEN_MODULES = {"pathlib", "subprocess", "ctypes", "glob", "shutil", "tempfile"}
FORBIDDEN_CALLS = {
    "open", "io.open",
    "os.open", "os.stat", "os.lstat", "os.listdir", "os.scandir", "os.walk",
    "os.path.exists", "os.path.isfile", "os.path.isdir", "os.path.islink",
    "os.path.realpath", "os.path.lexists", "os.path.getsize",
}


def _dotted(node: ast.AST) -> str | None:
    """`os.path.exists` for the expression os.path.exists; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def impurities(source: str, filename: str = "<source>") -> list[str]:
    """What in `source` touches the file system by path: forbidden imports, calls and
    names imported from `os`/`os.path` under any alias."""
    found: list[str] = []
    aliases: dict[str, str] = {}     # local name -> dotted original (import os.path as p)
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = dotted
                if dotted in FORBIDDEN_CALLS:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name is None:
                continue
            head, _, rest = name.partition(".")
            resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
            if resolved in FORBIDDEN_CALLS or name in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: {name}()")
    return found


@pytest.mark.parametrize("snippet", [
    "f = open('/etc/passwd')",
    "import os\nos.stat('/x')",
    "import os\nos.lstat('/x')",
    "import os\nos.open('/x', 0)",
    "import os\nos.listdir('/')",
    "import os\nos.scandir('/')",
    "import os\nos.walk('/')",
    "import os\nos.path.exists('/x')",
    "import os.path\nos.path.isfile('/x')",
    "import os.path as osp\nosp.isdir('/x')",
    "from os import path\npath.islink('/x')",
    "from os.path import realpath\nrealpath('/x')",
    "from os import stat as s\ns('/x')",
    "import io\nio.open('/x')",
    "import pathlib",
    "from pathlib import Path",
    "import subprocess",
    "import ctypes.util",
    "import glob",
])
def test_the_purity_check_catches(snippet):
    assert impurities(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import os\nos.fstat(3)",
    "import os\nos.pread(3, 10, 0)",
    "import os\nos.path.basename('/a/b')",
    "import os\nos.sendfile(4, 3, 0, 10)",
    "import mmap\nmmap.mmap(3, 10)",
    "data.open_section()",          # a method called open on some object is not open()
])
def test_the_purity_check_allows_descriptors_and_pure_path_strings(snippet):
    assert impurities(snippet) == []


FORMATS = sorted((PACKAGE / "formats").rglob("*.py"))


def test_formats_has_modules():
    names = {p.relative_to(PACKAGE / "formats").as_posix() for p in FORMATS}
    assert {"pe.py", "uki.py", "x86/segment_plan.py"} <= names


@pytest.mark.parametrize("path", FORMATS, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_formats_is_pure(path):
    assert impurities(path.read_text(), str(path)) == []
