"""The tests mirror the package: the test of module `relaunchd/<pkg>/<mod>.py` is
`tests/unit/<pkg>/test_<mod>.py`, so it is found by its name.

A module whose behaviour needs what only the integration tier has (a D-Bus daemon, a
software TPM, real signed UKIs and kernels) may instead be named in `INTEGRATION`, with the
integration test that exercises it and a pattern that test must contain — checked here, so
the entry cannot outlive the test. Every other module without a unit test fails.

Run as a script (`python tests/unit/test_layout.py`) it prints the comparison.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "daemon" / "relaunchd"
UNIT = REPO / "tests" / "unit"
INTEGRATION_DIR = REPO / "tests" / "integration"

# module → (integration test, a pattern that shows it exercises the module)
INTEGRATION: dict[str, tuple[str, str]] = {
    "bus/client.py": ("test_bus_service.py", r"bus_client\.Client\("),
    "bus/logind.py": ("test_inhibitors.py", r"from relaunchd\.bus\.logind import"),
    "bus/mainloop.py": ("test_daemon.py", r"daemon\.main\("),
    "bus/polkit.py": ("test_bus_service.py", r"def test_polkit_decides"),
    "bus/service.py": ("test_bus_service.py", r"def test_every_property"),
    "cli/cancel.py": ("test_bus_service.py", r'relaunchctl\(private_bus, "cancel"'),
    "cli/check.py": ("test_check_cli.py", r'main\(\["check"'),
    "cli/history.py": ("test_bus_service.py", r'relaunchctl\(private_bus, "history"'),
    "cli/images.py": ("test_bus_service.py", r'relaunchctl\(private_bus, "images"'),
    "cli/inspect.py": ("test_pcr11_oracles.py", r'main\(\["inspect"'),
    "cli/stage.py": ("test_staging.py", r'main\(\["stage"'),
    "formats/addons.py": ("test_addons.py", r"from relaunchd\.formats\.addons import"),
    "launch/staging.py": ("test_staging.py", r"staging\.prepare\("),
    "platform/pcr_values.py": ("test_sealed_volumes.py", r"pcr_values\.read\("),
    "platform/sealed_volumes.py": ("test_sealed_volumes.py", r"sealed_volumes\.report\("),
    "platform/tpm.py": ("test_check_tpm.py", r"from relaunchd\.platform import tpm"),
    "platform/tpm_extend_log.py": ("test_tpm_extend_log.py",
                                   r"tpm_extend_log\.extend_and_log\("),
}
# Unit tests that are not about one module.
CROSS_CUTTING = {"test_docs.py", "test_layers.py", "test_layout.py",
                 "engine/test_machine_contract.py", "cli/test_completion.py"}


def modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts)


def unit_test_of(module: str) -> Path:
    path = Path(module)
    return UNIT / path.parent / f"test_{path.name}"


def without_unit_test() -> list[str]:
    return [m for m in modules() if not unit_test_of(m).exists()]


def test_there_are_modules_to_compare():
    assert len(modules()) > 80 and "formats/pe.py" in modules()


@pytest.mark.parametrize("module", modules())
def test_every_module_has_its_test(module):
    if unit_test_of(module).exists():
        return
    assert module in INTEGRATION, (
        f"relaunchd/{module} has no tests/unit/{Path(module).parent}/test_"
        f"{Path(module).name} (nor an integration test named in INTEGRATION)")


@pytest.mark.parametrize("module", sorted(INTEGRATION))
def test_every_integration_entry_is_real(module):
    name, pattern = INTEGRATION[module]
    assert module in modules(), f"{module} no longer exists"
    assert not unit_test_of(module).exists(), f"{module} has a unit test now: drop the entry"
    text = (INTEGRATION_DIR / name).read_text()
    assert re.search(pattern, text), f"{name} does not exercise {module} ({pattern})"


def test_every_unit_test_is_named_after_a_module():
    names = set(modules())
    orphans = []
    for test in UNIT.rglob("test_*.py"):
        rel = test.relative_to(UNIT).as_posix()
        module = rel.replace("test_", "", 1) if "/" not in rel else \
            str(Path(rel).parent / Path(rel).name.removeprefix("test_"))
        if module not in names and rel not in CROSS_CUTTING:
            orphans.append(rel)
    assert orphans == []


if __name__ == "__main__":
    missing = without_unit_test()
    print(f"{len(modules())} modules under daemon/relaunchd; {len(missing)} without "
          "tests/unit/<pkg>/test_<module>.py:")
    for module in missing:
        where = INTEGRATION.get(module)
        print(f"  {module}" + (f"  (integration: tests/integration/{where[0]})" if where
                               else "  NO TEST"))
    sys.exit(1 if any(m not in INTEGRATION for m in missing) else 0)
