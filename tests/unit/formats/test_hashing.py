"""The single-pass multi-hash reader gives the same digests as hashing each range alone."""

from __future__ import annotations

import hashlib
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from relaunchd.formats import hashing


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=4096),
    specs=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 4096), st.integers(0, 300)),
                   min_size=1, max_size=6),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
    inline_limit=st.sampled_from([0, 1 << 20]),   # 0: every sink gets a worker thread
)
def test_feed_equals_direct_hashing(data, specs, chunk, inline_limit):
    old, old_inline = hashing.CHUNK, hashing.INLINE_LIMIT
    hashing.CHUNK = chunk
    hashing.INLINE_LIMIT = inline_limit
    try:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            sinks, expected = [], []
            for a, b, zeros in specs:
                start, end = sorted((min(a, len(data)), min(b, len(data))))
                # two ascending ranges per sink, like Authenticode's header holes
                mid = (start + end) // 2
                ranges = [(start, mid - start), (mid + 1, max(0, end - mid - 1))]
                ranges = [(o, n) for o, n in ranges if o <= len(data) and o + n <= len(data)]
                # literal pieces between and after the file ranges (generated cpios)
                pieces = [b"head", *[x for r in ranges for x in (r, b"mid%d" % r[0])], b"tail"]
                h = hashlib.sha256()
                sinks.append(hashing.Sink(h, pieces, zeros))
                ref = hashlib.sha256()
                for piece in pieces:
                    ref.update(piece if isinstance(piece, bytes) else
                               data[piece[0]:piece[0] + piece[1]])
                ref.update(bytes(zeros))
                expected.append(ref.hexdigest())
            seen = []
            hashing.feed(f.fileno(), sinks, progress=lambda d, t: seen.append((d, t)))
            assert [s.hasher.hexdigest() for s in sinks] == expected
            if seen:
                assert seen[-1][0] == seen[-1][1]
    finally:
        hashing.CHUNK, hashing.INLINE_LIMIT = old, old_inline


def test_base_offset():
    with tempfile.TemporaryFile() as f:
        f.write(b"xxxxhello")
        f.flush()
        h = hashlib.sha1()
        hashing.feed(f.fileno(), [hashing.Sink(h, [(0, 5)])], base=4)
        assert h.hexdigest() == hashlib.sha1(b"hello").hexdigest()
        os.lseek(f.fileno(), 0, 0)


def test_a_file_that_shrinks_mid_pass_is_an_error_not_sigbus():
    """Ranges were checked against the size at open; a writer truncating the file while
    the pass runs must give an OSError (InvalidImage upstream), never a SIGBUS."""
    old = hashing.CHUNK
    hashing.CHUNK = 1 << 16
    try:
        with tempfile.TemporaryFile() as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            h = hashlib.sha256()

            def shrink(done: int, total: int) -> None:
                if done >= 1 << 17:
                    os.ftruncate(f.fileno(), 1 << 18)

            try:
                hashing.feed(f.fileno(), [hashing.Sink(h, [(0, 1 << 20)])], progress=shrink)
            except OSError as exc:
                assert "shrank" in str(exc)
            else:
                raise AssertionError("the pass went on past the end of the file")
    finally:
        hashing.CHUNK = old


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=4096),
    hole=st.tuples(st.integers(0, 4096), st.integers(0, 4096)),
    specs=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 4096)), min_size=1,
                   max_size=4),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
    base=st.sampled_from([0, 5]),
)
def test_overlay_is_read_from_the_other_descriptor(data, hole, specs, chunk, base):
    """Staging's split copy: the image file has garbage where `.initrd` was cut out,
    the initrd memfd holds those bytes at 0 and more after them. Hashing the image
    with the overlay gives the digests of the original bytes, whatever the ranges."""
    start = min(hole[0], len(data))
    length = min(hole[1], len(data) - start)
    old = hashing.CHUNK
    hashing.CHUNK = chunk
    try:
        with tempfile.TemporaryFile() as main, tempfile.TemporaryFile() as other:
            holed = data[:start] + b"\xee" * length + data[start + length:]
            main.write(b"B" * base + holed)
            main.flush()
            other.write(data[start:start + length] + b"appended after the detached bytes")
            other.flush()
            sinks, expected = [], []
            for a, b in specs:
                lo, hi = sorted((min(a, len(data)), min(b, len(data))))
                sinks.append(hashing.Sink(hashlib.sha256(), [(lo, hi - lo)]))
                expected.append(hashlib.sha256(data[lo:hi]).hexdigest())
            hashing.feed(main.fileno(), sinks, base=base,
                         overlays=((start, length, other.fileno()),))
            assert [s.hasher.hexdigest() for s in sinks] == expected
    finally:
        hashing.CHUNK = old


def test_overlapping_overlays_are_refused():
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 100)
        f.flush()
        try:
            hashing.feed(f.fileno(), [hashing.Sink(hashlib.sha256(), [(0, 100)])],
                         overlays=((10, 20, f.fileno()), (25, 5, f.fileno())))
        except ValueError as exc:
            assert "overlap" in str(exc)
        else:
            raise AssertionError("overlapping overlays were accepted")
