#!/usr/bin/python3
"""The least work staging's design asks for, as a bound for `benchmarks/stage.py`.

Issue #5 fixes the order: copy the image into a memfd and seal it before anything is
verified, then verify the copy. Verifying a signed UKI and predicting its digests
takes two SHA-256 streams over the same bytes that cannot share work (the
Authenticode digest of the whole file, and the section digests that give the
initrd's digest). This script does only that, with no parsing at all: one in-kernel
copy of FILE into a sealed memfd, then both streams at once on two threads over the
mapped copy, then the memfd is freed. Whatever relaunchctl does on top of this is
our overhead; this part is not.

usage: stage_floor.py FILE INITRD_OFFSET INITRD_LENGTH
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import sys
import threading

CHUNK = 8 << 20
MADV_POPULATE_READ = 22
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def sealed_copy(path: str) -> tuple[int, int]:
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(src).st_size
    fd = os.memfd_create("floor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    done = 0
    while done < size:
        done += os.sendfile(fd, src, done, size - done)
    os.close(src)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd, size


def sha256(view: memoryview, start: int, end: int) -> str:
    digest = hashlib.sha256()
    for pos in range(start, end, CHUNK):
        digest.update(view[pos:min(end, pos + CHUNK)])
    return digest.hexdigest()


def main() -> int:
    path, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fd, size = sealed_copy(path)
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    mapping.madvise(MADV_POPULATE_READ, 0, size)
    view = memoryview(mapping)
    second = threading.Thread(target=sha256, args=(view, offset, offset + length))
    second.start()
    sha256(view, 0, size)
    second.join()
    view.release()
    mapping.close()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
