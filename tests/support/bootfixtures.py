"""Boot entry fixture trees (tests/fixtures/boot-entries/) made into machines.

Each scenario directory holds `esp/` (and maybe `xbootldr/`) as files, and
`scenario.json` with cases: a loader.conf to use, EFI variables to set, and the
expected order and selection, worked out by hand from systemd-boot 252's rules (the
fixture's "about" says which rules). Type #2 images are not stored: each
`EFI/Linux/NAME.efi.json` ({"osrel", "cmdline", "uname", "machine"}) becomes a real
UKI on Debian's systemd-stub (ukibuild) when the scenario is materialized.

A materialized scenario is a root prefix: the ESP at /efi, XBOOTLDR at /boot, EFI
variables under /sys/firmware/efi/efivars as efivarfs shows them (4 attribute bytes,
UTF-16LE, NUL-terminated).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from . import ukibuild

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "boot-entries"
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFI_VARIABLE_NV_BS_RT = 0x7
PE_MACHINES = {"aa64": 0xAA64, "x64": 0x8664}


def scenarios() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "scenario.json").exists())


def scenario(name: str) -> dict:
    return json.loads((FIXTURES / name / "scenario.json").read_text())


@dataclass(frozen=True)
class Machine:
    root: Path                 # the root prefix
    esp: str                   # platform paths
    xbootldr: str | None

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def efivar_bytes(value: str) -> bytes:
    return struct.pack("<I", EFI_VARIABLE_NV_BS_RT) + (value + "\0").encode("utf-16-le")


def set_efivars(root: Path, variables: dict[str, str]) -> None:
    directory = root / "sys" / "firmware" / "efi" / "efivars"
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in variables.items():
        (directory / f"{name}-{LOADER_GUID}").write_bytes(efivar_bytes(value))


def build_uki(spec: dict, out: Path) -> Path:
    """A small but real UKI: the stub, the given text sections and a stand-in .linux."""
    sections: list[tuple[str, bytes | Path]] = []
    for name in ("osrel", "cmdline", "uname"):
        if spec.get(name) is not None:
            sections.append((f".{name}", spec[name].encode()))
    sections.append((".linux", b"MZ stand-in kernel: only listed, never booted\n"))
    ukibuild.build_uki(ukibuild.UkiSpec(sections), out)
    machine = spec.get("machine")
    if machine:
        data = bytearray(out.read_bytes())
        pe = struct.unpack_from("<I", data, 0x3C)[0]
        struct.pack_into("<H", data, pe + 4, PE_MACHINES[machine])
        out.write_bytes(bytes(data))
    return out


def _copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("*.efi.json"))
    for spec in sorted(src.rglob("*.efi.json")):
        target = dest / spec.relative_to(src).with_suffix("")
        build_uki(json.loads(spec.read_text()), target)


def merged_esp(dest: Path, names: list[str]) -> list[str]:
    """The ESP trees of several scenarios in one directory, as a FAT file system can
    hold them: no symbolic links (mcopy would copy their target), and a name that
    differs from one already there only in case is left out. Returns what was left out."""
    left_out: list[str] = []
    for name in names:
        staging = dest.parent / f".{name}-esp"
        _copy_tree(FIXTURES / name / "esp", staging)
        for path in sorted(staging.rglob("*")):
            rel = path.relative_to(staging)
            target = dest / rel
            if path.is_symlink():
                left_out.append(f"{name}/{rel} (symbolic link)")
            elif path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif target.exists():
                if target.read_bytes() != path.read_bytes():
                    left_out.append(f"{name}/{rel} (another scenario's file)")
            elif any(p.name.lower() == target.name.lower() for p in target.parent.iterdir()):
                left_out.append(f"{name}/{rel} (differs only in case)")
            else:
                shutil.copy2(path, target)
        shutil.rmtree(staging)
    return left_out


def materialize(name: str, dest: Path, case: dict | None = None) -> Machine:
    """The scenario as a root prefix under `dest`, with the case's loader.conf and EFI
    variables applied."""
    src = FIXTURES / name
    _copy_tree(src / "esp", dest / "efi")
    xbootldr = None
    if (src / "xbootldr").is_dir():
        _copy_tree(src / "xbootldr", dest / "boot")
        xbootldr = "/boot"
    case = case or {}
    if "loader_conf" in case:
        (dest / "efi" / "loader").mkdir(exist_ok=True)
        (dest / "efi" / "loader" / "loader.conf").write_text(case["loader_conf"])
    if case.get("efivars"):
        set_efivars(dest, case["efivars"])
    return Machine(dest, "/efi", xbootldr)


def tree(root, files: dict[str, str | bytes]) -> None:
    """Write `files` ({path under root: content}) below `root`, making directories."""
    for rel, content in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
