"""The kexec system calls (relaunchd.platform.kexec_syscalls) without making them: libc's
`syscall` is replaced by a recorder for every test in this file (autouse fixture, checked
before each call), so nothing is ever loaded into or unloaded from the host's kernel.

Checked against the kernel's own headers (linux-libc-dev): the syscall numbers
(asm/unistd_64.h, asm-generic/unistd.h), the flags and limits (linux/kexec.h), and the
layout of `struct kexec_segment` as the recorder reads it from the table it is given."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relaunchd.errors import KexecFailed, Unsupported
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86.segment_plan import Segment
from relaunchd.platform import kexec_syscalls

HEADERS = Path("/usr/include")


def define(header: str, name: str) -> int:
    text = (HEADERS / header).read_text()
    m = re.search(rf"^#define\s+{name}\s+(.+?)\s*(?:/\*.*)?$", text, re.M)
    assert m, f"{name} not in {header}"
    # integer literals, optionally shifted: "320", "0x00000004", "(62 << 16)"
    value, _, shift = m.group(1).strip("()").partition("<<")
    return int(value.strip(), 0) << (int(shift.strip(), 0) if shift else 0)


@dataclass
class Call:
    args: tuple
    segments: list[tuple[bytes, int, int]] = field(default_factory=list)  # (data, mem, memsz)


class RecordingLibc:
    """Stands in for libc: records each syscall and answers with `errno_to_set` (0: ok)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.errno_to_set = 0

    def syscall(self, *args):
        values = tuple(a.value if hasattr(a, "value") else a for a in args)
        call = Call(values)
        if values[0] == kexec_syscalls.SYSCALLS["x86_64"][1]:     # kexec_load: read the table
            table = ctypes.cast(args[3], ctypes.POINTER(kexec_syscalls._Segment))
            for i in range(values[2]):
                seg = table[i]
                call.segments.append((ctypes.string_at(seg.buf, seg.bufsz), seg.mem, seg.memsz))
        self.calls.append(call)
        if self.errno_to_set:
            ctypes.set_errno(self.errno_to_set)
            return -1
        return 0


@pytest.fixture(autouse=True)
def libc(monkeypatch) -> RecordingLibc:
    fake = RecordingLibc()
    monkeypatch.setattr(kexec_syscalls, "_libc", lambda: fake)
    assert kexec_syscalls._libc() is fake          # never the real syscall from here on
    return fake


@pytest.fixture(autouse=True)
def x86_64(monkeypatch):
    uname = os.uname()
    monkeypatch.setattr(kexec_syscalls.os, "uname", lambda: os.uname_result(
        (uname.sysname, uname.nodename, uname.release, uname.version, "x86_64")))


def test_the_numbers_and_flags_are_the_kernels():
    assert kexec_syscalls.SYSCALLS["x86_64"] == (
        define("x86_64-linux-gnu/asm/unistd_64.h", "__NR_kexec_file_load"),
        define("x86_64-linux-gnu/asm/unistd_64.h", "__NR_kexec_load"))
    generic = (define("asm-generic/unistd.h", "__NR_kexec_file_load"),
               define("asm-generic/unistd.h", "__NR_kexec_load"))
    assert kexec_syscalls.SYSCALLS["aarch64"] == kexec_syscalls.SYSCALLS["riscv64"] == generic
    assert define("linux/kexec.h", "KEXEC_FILE_UNLOAD") == kexec_syscalls.KEXEC_FILE_UNLOAD
    no_initramfs = define("linux/kexec.h", "KEXEC_FILE_NO_INITRAMFS")
    assert no_initramfs == kexec_syscalls.KEXEC_FILE_NO_INITRAMFS
    assert define("linux/kexec.h", "KEXEC_ARCH_X86_64") == kexec_syscalls.KEXEC_ARCH_X86_64
    assert define("linux/kexec.h", "KEXEC_SEGMENT_MAX") == kexec_syscalls.KEXEC_SEGMENT_MAX


def test_struct_kexec_segment_has_the_kernels_layout():
    text = (HEADERS / "linux/kexec.h").read_text()
    body = re.search(r"struct kexec_segment \{(.*?)\};", text, re.S).group(1)
    fields = re.findall(r"(\w+);", body)
    assert fields == ["buf", "bufsz", "mem", "memsz"]
    ours = kexec_syscalls._Segment
    assert [name for name, _ in ours._fields_] == fields
    # pointers and size_t: 8 bytes each on x86_64, no padding
    assert [getattr(ours, f).offset for f in fields] == [0, 8, 16, 24]
    assert ctypes.sizeof(ours) == 32


def test_file_load_arguments(libc):
    kexec_syscalls.file_load(5, 6, b"console=ttyS0\0")
    kexec_syscalls.file_load(5, None, b"quiet\0")
    (with_initrd, without) = libc.calls
    assert with_initrd.args[:4] == (320, 5, 6, len(b"console=ttyS0\0"))
    assert with_initrd.args[5] == 0
    assert without.args[2] == -1 and without.args[5] == kexec_syscalls.KEXEC_FILE_NO_INITRAMFS


def test_file_load_refuses_a_command_line_without_its_nul(libc):
    with pytest.raises(ValueError, match="NUL"):
        kexec_syscalls.file_load(5, None, b"quiet")
    assert libc.calls == []


def test_unload(libc):
    kexec_syscalls.file_unload()
    [call] = libc.calls
    assert call.args[:4] == (320, -1, -1, 0) and call.args[5] == kexec_syscalls.KEXEC_FILE_UNLOAD


@pytest.mark.parametrize("err", sorted(kexec_syscalls.REMEDIES))
def test_every_errno_becomes_a_named_error_with_its_remedy(libc, err):
    libc.errno_to_set = err
    with pytest.raises(KexecFailed) as info:
        kexec_syscalls.file_load(5, 6, b"x\0")
    assert info.value.errno == err and info.value.name == "KexecFailed"
    message = str(info.value)
    assert message.startswith(f"kexec_file_load failed with {errno.errorcode[err]}: ")
    assert kexec_syscalls.REMEDIES[err] in message


def test_an_errno_without_a_remedy_is_explained_by_strerror(libc):
    libc.errno_to_set = errno.EIO
    with pytest.raises(KexecFailed, match=f"EIO: {os.strerror(errno.EIO)}"):
        kexec_syscalls.file_unload()


def test_segment_load_hands_the_kernel_a_table_of_the_segments(libc, tmp_path):
    data = os.urandom(3 * 4096 + 123)
    fd = os.memfd_create("kexec-test")
    try:
        os.write(fd, data)
        # a file range at an offset that is not page-aligned: mapped, not copied
        ranged = Segment("kernel", 0x100000, 0x4000, FileRange(fd, 4096 + 17, 5000))
        literal = Segment("cmdline", 0x20000, 0x1000, b"console=ttyS0\0")
        kexec_syscalls.segment_load(0x30000, [ranged, literal])
    finally:
        os.close(fd)
    [call] = libc.calls
    assert call.args[:3] == (246, 0x30000, 2)
    assert call.args[4] == kexec_syscalls.KEXEC_ARCH_X86_64
    assert call.segments == [(data[4096 + 17:4096 + 17 + 5000], 0x100000, 0x4000),
                             (b"console=ttyS0\0", 0x20000, 0x1000)]


def test_too_many_segments_are_refused_before_the_call(libc):
    segments = [Segment(f"s{i}", i * 0x1000, 0x1000, b"x") for i in range(17)]
    with pytest.raises(KexecFailed, match="at most 16"):
        kexec_syscalls.segment_load(0, segments)
    assert libc.calls == []


def test_a_failed_segment_load_is_named(libc):
    libc.errno_to_set = errno.EADDRNOTAVAIL
    with pytest.raises(KexecFailed, match="kexec_load failed with EADDRNOTAVAIL: no memory hole"):
        kexec_syscalls.segment_load(0, [Segment("s", 0x1000, 0x1000, b"x")])


def test_an_unsupported_machine(monkeypatch, libc):
    uname = os.uname()
    monkeypatch.setattr(kexec_syscalls.os, "uname", lambda: os.uname_result(
        (uname.sysname, uname.nodename, uname.release, uname.version, "ppc64le")))
    with pytest.raises(Unsupported, match="ppc64le"):
        kexec_syscalls.file_load(5, None, b"x\0")
    assert libc.calls == []
