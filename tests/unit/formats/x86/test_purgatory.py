"""The hand-assembled purgatory (relaunchd.formats.x86.purgatory), checked by binutils'
disassembler."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.formats.x86 import purgatory
from support.tools import require

OBJDUMP = shutil.which("objdump")


def disassemble(code: bytes, tmp_path) -> list[tuple[str, str]]:
    """(mnemonic, operands) per instruction, from objdump in Intel syntax."""
    path = tmp_path / "purgatory.bin"
    path.write_bytes(code)
    require("objdump")
    out = subprocess.run([OBJDUMP, "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel",
                          str(path)], capture_output=True, text=True, check=True).stdout
    insns = []
    for line in out.splitlines():
        # "   0:\tfa                   \tcli"
        m = re.match(r"\s*[0-9a-f]+:\t[0-9a-f ]+\t(\S+)\s*(.*)$", line)
        if m:
            insns.append((m.group(1), m.group(2).strip()))
    return insns


@pytest.mark.parametrize("cli", [True, False])
def test_objdump_reads_our_instructions(tmp_path, cli):
    zero_page, kernel = 0x100000, purgatory.kernel_entry(0x1000000)
    assert kernel == 0x1000200
    code = purgatory.build_purgatory(zero_page, kernel, cli=cli)
    insns = disassemble(code, tmp_path)
    expected = [("movabs", "rsi,0x100000"), ("movabs", "rax,0x1000200"), ("jmp", "rax")]
    assert insns == ([("cli", "")] if cli else []) + expected
    assert len(code) == (23 if cli else 22)


def test_full_width_immediates(tmp_path):
    code = purgatory.build_purgatory(0xFEDCBA9876543210, 0x0123456789ABCDEF, cli=False)
    assert disassemble(code, tmp_path) == [("movabs", "rsi,0xfedcba9876543210"),
                                           ("movabs", "rax,0x123456789abcdef"),
                                           ("jmp", "rax")]


def test_encoding_bytes():
    code = purgatory.build_purgatory(0x11223344, 0x55667788)
    assert code == bytes.fromhex("fa 48be 4433221100000000 48b8 8877665500000000 ffe0")


def test_address_range():
    with pytest.raises(InvalidArgument):
        purgatory.build_purgatory(1 << 64, 0)
    with pytest.raises(InvalidArgument):
        purgatory.build_purgatory(0, -1)
