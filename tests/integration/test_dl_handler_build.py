"""The DL handler build: Debian's gcc/binutils, reproducible (two builds in two
different directories give the same bytes, which are the ones `make setup`
installed into build/), position independent (no run-time relocation)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "daemon/relaunchd/launch/dl_handler"
BUILT = REPO / "build/dl-handler/txt-dl-handler.bin"


def build(out: Path) -> Path:
    subprocess.run(["make", "-s", "-C", str(SRC), f"O={out}"], check=True, timeout=300,
                   capture_output=True)
    return out / "txt-dl-handler.bin"


def test_two_builds_are_identical_and_match_the_installed_one(tmp_path):
    a = build(tmp_path / "one" / "deep")
    b = build(tmp_path / "two")
    assert a.read_bytes() == b.read_bytes()
    assert BUILT.exists(), "make setup builds build/dl-handler/txt-dl-handler.bin"
    assert a.read_bytes() == BUILT.read_bytes()
    assert str(tmp_path).encode() not in a.read_bytes()


def test_no_runtime_relocations(tmp_path):
    elf = build(tmp_path).with_suffix(".elf")
    relocs = subprocess.run(["readelf", "-r", "-W", str(elf)], capture_output=True,
                            text=True, check=True).stdout
    assert "There are no relocations" in relocs, relocs
    # and the linker script's own guard is live: an absolute pointer breaks the build
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in SRC.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with open(bad / "handler.c", "a") as f:
        f.write("\nvoid *rld_absolute_pointer = (void *)&rld_params;\n")
    p = subprocess.run(["make", "-s", "-C", str(bad), f"O={bad / 'o'}"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "run-time relocations" in p.stderr, p.stderr
