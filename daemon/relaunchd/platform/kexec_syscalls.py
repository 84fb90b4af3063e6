"""The kexec system calls (platform layer).

`kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags)` and
`kexec_load(entry, nr_segments, segments, flags)` have no glibc wrappers;
they are called through `syscall(2)` (numbers: uki.md §4.1,
kexec-load-notes.md). Every errno becomes a named error with a remedy. The
result is confirmed through `/sys/kernel/kexec_loaded`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Sequence
from typing import ClassVar

from relaunchd.errors import KexecFailed, Unsupported
from relaunchd.formats.pe import FileRange
from relaunchd.formats.x86.segment_plan import Segment

SYSCALLS = {  # machine -> (kexec_file_load, kexec_load)
    "x86_64": (320, 246),
    "aarch64": (294, 104),
    "riscv64": (294, 104),
}
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_NO_INITRAMFS = 0x4
KEXEC_ARCH_X86_64 = 62 << 16
KEXEC_SEGMENT_MAX = 16

REMEDIES = {
    errno.EPERM: "not permitted: needs CAP_SYS_BOOT (run as root), and kexec must not be "
                 "disabled (kernel.kexec_load_disabled) or refused by lockdown",
    errno.EKEYREJECTED: "the running kernel rejected the new kernel's signature: sign it "
                        "with a key in the kernel's builtin, secondary or platform keyring",
    errno.ENOKEY: "the new kernel is signed by a key the running kernel does not trust: "
                  "enroll the key (MOK / db) or use a kernel signed by a trusted key",
    errno.EBADMSG: "the new kernel's signature is malformed",
    errno.ELIBBAD: "the new kernel's PE signature could not be parsed",
    errno.ENOEXEC: "the running kernel does not recognise the kernel image format "
                   "(not a bzImage for this architecture, or truncated)",
    errno.EINVAL: "the kernel rejected the arguments (command line too long or not "
                  "NUL-terminated, empty file, or an unsupported flag)",
    errno.EBUSY: "another kexec load or kexec is in progress: retry",
    errno.ENOMEM: "not enough memory to hold the new kernel and initrd",
    errno.EADDRNOTAVAIL: "no memory hole for a segment",
    errno.EFBIG: "a file is too large for kexec",
    errno.ENOSYS: "the running kernel has no kexec support (CONFIG_KEXEC / "
                  "CONFIG_KEXEC_FILE off)",
    errno.ETXTBSY: "a file given to kexec is open for writing elsewhere",
}


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall_numbers() -> tuple[int, int]:
    machine = os.uname().machine
    if machine not in SYSCALLS:
        raise Unsupported(f"kexec is not supported on {machine} by relaunchd")
    return SYSCALLS[machine]


def _fail(call: str, err: int) -> KexecFailed:
    name = errno.errorcode.get(err, str(err))
    remedy = REMEDIES.get(err, os.strerror(err))
    error = KexecFailed(f"{call} failed with {name}: {remedy}")
    error.errno = err
    return error


def file_load(kernel_fd: int, initrd_fd: int | None, cmdline: bytes) -> None:
    """Load with kexec_file_load; `cmdline` must end with a NUL."""
    if not cmdline.endswith(b"\0"):
        raise ValueError("cmdline must be NUL-terminated")
    number, _ = _syscall_numbers()
    flags = 0 if initrd_fd is not None else KEXEC_FILE_NO_INITRAMFS
    libc = _libc()
    buf = ctypes.create_string_buffer(cmdline, len(cmdline))
    rc = libc.syscall(ctypes.c_long(number), ctypes.c_long(kernel_fd),
                      ctypes.c_long(initrd_fd if initrd_fd is not None else -1),
                      ctypes.c_ulong(len(cmdline)), buf, ctypes.c_ulong(flags))
    if rc != 0:
        raise _fail("kexec_file_load", ctypes.get_errno())


def file_unload() -> None:
    number, _ = _syscall_numbers()
    libc = _libc()
    rc = libc.syscall(ctypes.c_long(number), ctypes.c_long(-1), ctypes.c_long(-1),
                      ctypes.c_ulong(0), None, ctypes.c_ulong(KEXEC_FILE_UNLOAD))
    if rc != 0:
        raise _fail("kexec_file_load(UNLOAD)", ctypes.get_errno())


class _Segment(ctypes.Structure):
    # struct kexec_segment (include/uapi/linux/kexec.h)
    _fields_: ClassVar = [("buf", ctypes.c_void_p), ("bufsz", ctypes.c_size_t),
                ("mem", ctypes.c_void_p), ("memsz", ctypes.c_size_t)]


def segment_load(entry: int, segments: Sequence[Segment]) -> None:
    """Load with kexec_load. File-backed segments are mapped privately (a
    sealed memfd cannot be mapped writable-shared, and ctypes needs a writable
    buffer to take an address); nothing is copied in Python."""
    if len(segments) > KEXEC_SEGMENT_MAX:
        raise KexecFailed(f"{len(segments)} segments; kexec_load takes at most "
                          f"{KEXEC_SEGMENT_MAX}")
    _, number = _syscall_numbers()
    keep: list = []
    table = (_Segment * len(segments))()
    try:
        for i, seg in enumerate(segments):
            if isinstance(seg.data, FileRange):
                source = seg.data
                page = mmap.ALLOCATIONGRANULARITY
                base = source.offset - source.offset % page
                mapping = mmap.mmap(source.fd, source.length + source.offset - base,
                                    flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
                keep.append(mapping)
                address = (ctypes.addressof(ctypes.c_char.from_buffer(mapping))
                           + source.offset - base)
                size = source.length
            else:
                data = bytes(seg.data)
                buffer = ctypes.create_string_buffer(data, len(data))
                keep.append(buffer)
                address, size = ctypes.addressof(buffer), len(data)
            table[i] = _Segment(address, size, seg.address, seg.memsz)
        libc = _libc()
        rc = libc.syscall(ctypes.c_long(number), ctypes.c_ulong(entry),
                          ctypes.c_ulong(len(segments)), table,
                          ctypes.c_ulong(KEXEC_ARCH_X86_64))
        if rc != 0:
            raise _fail("kexec_load", ctypes.get_errno())
    finally:
        for item in keep:
            if isinstance(item, mmap.mmap):
                # ctypes may still reference it; then it is freed with the object
                with contextlib.suppress(BufferError):
                    item.close()
