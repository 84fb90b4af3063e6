"""Hash many byte ranges of one file in a single read pass (formats layer).

PCR prediction needs every section hashed in up to four banks, Authenticode
needs the same bytes again in another order and with holes. Reading the file
once per hash would multiply I/O and, with mmap, resident memory. Instead one
reader walks the union of all ranges in file order with a fixed buffer and
hands each chunk to every hash that wants it; hashlib releases the GIL for
large updates, so the hashes run on all cores at once (DESIGN: "read each
section once, hash banks in parallel threads").

Memory stays at one chunk buffer however large the image is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

CHUNK = 8 << 20
_ZEROS = bytes(1 << 20)


class Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


@dataclass
class Sink:
    """One hash fed with file ranges in ascending order, then `zero_fill` zeros."""

    hasher: Hash
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    zero_fill: int = 0

    def __post_init__(self) -> None:
        last = -1
        for offset, length in self.ranges:
            if offset < last or length < 0:
                raise ValueError("sink ranges must be ascending and non-overlapping")
            last = offset + length


def feed(fd: int, sinks: list[Sink], *, base: int = 0,
         progress: Callable[[int, int], None] | None = None,
         threads: int | None = None) -> None:
    """Read the ranges of all sinks from `fd` (offsets relative to `base`)
    once, in file order, and update every sink's hash with its parts."""
    if not sinks:
        return
    total = sum(n for s in sinks for _, n in s.ranges)
    workers = threads or min(len(sinks), os.cpu_count() or 1)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    cursor = [0] * len(sinks)   # index of each sink's current range
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start, end in _windows(sinks):
                length = end - start
                got = os.preadv(fd, [view[:length]], base + start)
                if got != length:
                    raise OSError(f"short read at {start}: {got} of {length} bytes")
                jobs = []
                for i, sink in enumerate(sinks):
                    parts = _parts_in(sink, cursor, i, start, end)
                    if parts:
                        jobs.append((sink.hasher, [view[a - start:b - start] for a, b in parts]))
                        done += sum(b - a for a, b in parts)
                _run(pool, jobs)
                if progress:
                    progress(done, total)
            _run(pool, [(s.hasher, None, s.zero_fill) for s in sinks if s.zero_fill])
    finally:
        view.release()


def _windows(sinks: list[Sink]):
    """Chunk-sized windows covering every byte some sink wants, skipping gaps."""
    covered = sorted((off, off + n) for s in sinks for off, n in s.ranges if n)
    merged: list[list[int]] = []
    for a, b in covered:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in merged:
        pos = a
        while pos < b:
            nxt = min(b, pos + CHUNK)
            yield pos, nxt
            pos = nxt


def _parts_in(sink: Sink, cursor: list[int], i: int, start: int, end: int):
    parts = []
    while cursor[i] < len(sink.ranges):
        off, n = sink.ranges[cursor[i]]
        a, b = max(off, start), min(off + n, end)
        if off >= end:
            break
        if a < b:
            parts.append((a, b))
        if off + n <= end:
            cursor[i] += 1
        else:
            break
    return parts


def _run(pool: ThreadPoolExecutor, jobs: list) -> None:
    if not jobs:
        return
    if len(jobs) == 1:
        _apply(*jobs[0])
        return
    for future in [pool.submit(_apply, *job) for job in jobs]:
        future.result()


def _apply(hasher: Hash, views, zeros: int = 0) -> None:
    if views is not None:
        for v in views:
            hasher.update(v)
    while zeros > 0:
        step = min(zeros, len(_ZEROS))
        hasher.update(_ZEROS[:step] if step < len(_ZEROS) else _ZEROS)
        zeros -= step
