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

import bisect
import errno
import hashlib
import itertools
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 8 << 20
_ZEROS = bytes(1 << 20)


@dataclass
class Sink:
    """One hash fed with pieces in order — file ranges `(offset, length)`
    ascending in the file, and literal `bytes` between or after them — then
    `zero_fill` zeros."""

    # A hashlib object, or anything with update(bytes | memoryview). Not spelled as a
    # typing.Protocol: importing typing (~2.5 ms) would delay the start of the hash
    # pass in `relaunchctl inspect`, and annotations are never evaluated.
    hasher: hashlib._Hash
    ranges: list[tuple[int, int] | bytes] = field(default_factory=list)
    zero_fill: int = 0

    def __post_init__(self) -> None:
        last = -1
        for piece in self.ranges:
            if isinstance(piece, bytes):
                continue
            offset, length = piece
            if offset < last or length < 0:
                raise ValueError("sink ranges must be ascending and non-overlapping")
            last = offset + length

    @property
    def file_bytes(self) -> int:
        return sum(p[1] for p in self.ranges if not isinstance(p, bytes))


def feed(fd: int, sinks: list[Sink], *, base: int = 0,
         overlays: tuple[tuple[int, int, int], ...] = (),
         progress: Callable[[int, int], None] | None = None) -> None:
    """Read the ranges of all sinks from `fd` (offsets relative to `base`)
    once, in file order, and update every sink's hash with its parts.

    `overlays` are `(offset, length, other_fd)`: bytes [offset, offset+length)
    of the file are read from `other_fd` at 0 instead (staging keeps a UKI's
    `.initrd` in the initrd memfd rather than in the image copy, sealed.split_copy).

    Large sinks get a worker thread each, fed through a FIFO so their updates
    stay in order; small sinks are updated inline. The file is mapped and
    hashed in place (a pread copy costs as much as a SHA-256 pass here); at
    most RING windows are in flight and each is dropped from our resident set
    (MADV_DONTNEED) once every sink has consumed it, so memory stays bounded
    however large the image."""
    if not sinks:
        return
    total = sum(s.file_bytes for s in sinks)
    cuts = sorted({edge for offset, length, _ in overlays for edge in (offset, offset + length)})
    windows = list(_windows(sinks, cuts))
    source = _Source(fd, base, overlays, windows)
    workers = {i: _Worker(s.hasher) for i, s in enumerate(sinks)
               if s.file_bytes >= INLINE_LIMIT}
    pending: list[_Window] = []
    cursor = [0] * len(sinks)   # index of each sink's current range
    done = 0
    try:
        for start, end in windows:
            # Bound memory: at most RING windows populated or copied ahead of the workers.
            while len(pending) >= RING:
                pending.pop(0).wait_free()
            window = source.window(start, end)
            pending.append(window)
            jobs = []
            for i, sink in enumerate(sinks):
                parts = _parts_in(sink, cursor, i, start, end)
                if not parts:
                    continue
                views = [memoryview(p) if isinstance(p, bytes)
                         else window.view[p[0] - start:p[1] - start] for p in parts]
                done += sum(p[1] - p[0] for p in parts if not isinstance(p, bytes))
                if i in workers:
                    jobs.append((workers[i], views))
                else:
                    for v in views:
                        sink.hasher.update(v)
                        v.release()
            window.hand_out(len(jobs))
            for worker, views in jobs:
                worker.submit(views, window)
            if not jobs:
                window.drop_pages()
            if progress:
                progress(done, total)
        for i, sink in enumerate(sinks):
            tail = [memoryview(p) for p in sink.ranges[cursor[i]:] if isinstance(p, bytes)]
            target = workers.get(i)
            if tail:
                if target:
                    target.submit(tail, None)
                else:
                    for v in tail:
                        sink.hasher.update(v)
            if sink.zero_fill:
                if target:
                    target.submit_zeros(sink.zero_fill)
                else:
                    _zeros(sink.hasher, sink.zero_fill)
    finally:
        for worker in workers.values():
            worker.close()
        for window in pending:
            window.wait_free()
        source.close()
    errors = [w.error for w in workers.values() if w.error]
    if errors:
        raise errors[0]


INLINE_LIMIT = 1 << 20   # sinks smaller than this are hashed by the reader itself
RING = 4                 # windows in flight (populated or copied) ahead of the workers
MADV_POPULATE_READ = 22  # Linux 5.14 (uapi/asm-generic/mman-common.h); not in Python 3.11


class _Window:
    """A chunk of the file handed to several workers.

    With a mapping, the last consumer to finish drops the window's pages from our
    resident set (MADV_DONTNEED on a shared file mapping only unmaps), so RSS stays
    near RING × CHUNK. Dropping them as soon as the first consumer is done would
    make every slower one re-fault each page: ~20 % more time for two SHA-256
    streams over the same 100 MB."""

    def __init__(self, view: memoryview, drop: Callable[[], None]):
        self.view: memoryview | None = view
        self.drop_pages = drop
        self._pending = 0
        self._cond = threading.Condition()

    def hand_out(self, users: int) -> None:
        with self._cond:
            self._pending = users
            if users == 0:
                self._free_locked()

    def release(self) -> None:
        """One consumer is done with the window; the last one drops its pages."""
        with self._cond:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.drop_pages()
            with self._cond:
                self._free_locked()

    def _free_locked(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        self._cond.notify_all()

    def wait_free(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.view is None)


class _Extent:
    """Windows of one stretch of the file from one descriptor: views into a
    read-only mapping, or (for descriptors that cannot be mapped) pread copies."""

    def __init__(self, fd: int, shift: int, windows: list[tuple[int, int]]):
        self.fd = fd
        self.shift = shift          # file offset + shift = offset in fd
        self.mapping: mmap.mmap | None = None
        self.map_start = 0
        self._whole: memoryview | None = None
        if not windows:
            return
        first = shift + windows[0][0]
        last = shift + windows[-1][1]
        map_start = first - first % mmap.ALLOCATIONGRANULARITY
        try:
            self.mapping = mmap.mmap(fd, last - map_start, prot=mmap.PROT_READ,
                                     flags=mmap.MAP_SHARED, offset=map_start)
        except (OSError, ValueError):
            return
        self.map_start = map_start
        self._whole = memoryview(self.mapping)

    def window(self, start: int, end: int) -> _Window:
        if self._whole is None:
            buf = bytearray(end - start)
            got = os.preadv(self.fd, [buf], self.shift + start)
            if got != end - start:
                raise OSError(f"short read at {start}: {got} of {end - start} bytes")
            return _Window(memoryview(buf), lambda: None)
        mapping = self.mapping
        lo = self.shift + start - self.map_start
        hi = self.shift + end - self.map_start

        def drop() -> None:
            # Only whole pages inside the window; neighbours may still be in use.
            page = mmap.PAGESIZE
            a = -(-lo // page) * page
            b = hi // page * page
            if b > a:
                mapping.madvise(mmap.MADV_DONTNEED, a, b - a)

        # Fault the window's pages in here, in the reader thread, while the workers
        # hash the windows before it: a worker touching unmapped pages pays ~15 % of a
        # SHA-256 pass in page faults.
        page = mmap.PAGESIZE
        first = lo // page * page
        try:
            mapping.madvise(MADV_POPULATE_READ, first, hi - first)
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                # The file shrank under us (only an unsealed file can): a named error
                # now instead of a SIGBUS in a worker.
                raise OSError(errno.EFAULT, f"the file shrank while being read (window at "
                                            f"{self.map_start + first:#x})") from None
            # EINVAL before Linux 5.14: the workers fault the pages in themselves.
        return _Window(self._whole[lo:hi], drop)

    def close(self) -> None:
        if self._whole is not None:
            self._whole.release()
            self.mapping.close()


class _Source:
    """The file as windows: the main descriptor, except where an overlay
    supplies a stretch from another one. Windows never straddle an overlay's
    edge (`_windows` cuts there)."""

    def __init__(self, fd: int, base: int, overlays: tuple[tuple[int, int, int], ...],
                 windows: list[tuple[int, int]]):
        spans = sorted(overlays)
        for (a, n, _), (b, _, _) in itertools.pairwise(spans):
            if a + n > b:
                raise ValueError("hash overlays overlap")
        inside = [[w for w in windows if a <= w[0] and w[1] <= a + n] for a, n, _ in spans]
        claimed = {w for group in inside for w in group}
        self._overlays = [(a, a + n, _Extent(ofd, -a, group))
                          for (a, n, ofd), group in zip(spans, inside, strict=True)]
        self._main = _Extent(fd, base, [w for w in windows if w not in claimed])

    def window(self, start: int, end: int) -> _Window:
        for a, b, extent in self._overlays:
            if a <= start < b:
                return extent.window(start, end)
        return self._main.window(start, end)

    def close(self) -> None:
        self._main.close()
        for _, _, extent in self._overlays:
            extent.close()


class _Worker:
    """A thread owning one hash; items arrive in file order through a FIFO."""

    def __init__(self, hasher: hashlib._Hash):
        self.hasher = hasher
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, views: list[memoryview], buf: _Window | None) -> None:
        self._queue.put((views, buf))

    def submit_zeros(self, count: int) -> None:
        self._queue.put((count, None))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            payload, buf = item
            try:
                if self.error is None:
                    if isinstance(payload, int):
                        _zeros(self.hasher, payload)
                    else:
                        for v in payload:
                            self.hasher.update(v)
                            v.release()
            except BaseException as exc:  # reported by feed() after the join
                self.error = exc
            finally:
                if buf is not None:
                    buf.release()


def _windows(sinks: list[Sink], cuts: list[int]):
    """Chunk-sized windows covering every byte some sink wants, skipping gaps
    and cut at each offset in `cuts` (ascending)."""
    covered = sorted((p[0], p[0] + p[1]) for s in sinks for p in s.ranges
                     if not isinstance(p, bytes) and p[1])
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
            i = bisect.bisect_right(cuts, pos)
            if i < len(cuts) and cuts[i] < nxt:
                nxt = cuts[i]
            yield pos, nxt
            pos = nxt


def _parts_in(sink: Sink, cursor: list[int], i: int, start: int, end: int) -> list:
    """The pieces of `sink` due in window [start, end): literal bytes as they
    come, file ranges clipped to (a, b) absolute offsets."""
    parts: list = []
    while cursor[i] < len(sink.ranges):
        piece = sink.ranges[cursor[i]]
        if isinstance(piece, bytes):
            parts.append(piece)
            cursor[i] += 1
            continue
        off, n = piece
        if off >= end and n:
            break
        a, b = max(off, start), min(off + n, end)
        if a < b:
            parts.append((a, b))
        if off + n <= end:
            cursor[i] += 1
        else:
            break
    return parts


def _zeros(hasher: hashlib._Hash, count: int) -> None:
    while count > 0:
        step = min(count, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:step])
        count -= step
