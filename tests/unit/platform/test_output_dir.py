"""platform.output_dir: `--dry-run --output DIR` writes only into the caller's own
directory, each file created O_EXCL|O_NOFOLLOW relative to its descriptor."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.platform import output_dir
from support.path_cases import NOBODY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody)")

# ---------------------------------------------------------------- --output DIR


def writers(**files: bytes) -> list[tuple[str, output_dir.Writer]]:
    return [(name, lambda fd, data=data: os.write(fd, data)) for name, data in files.items()]


def test_output_directory_is_made_private_or_must_be_the_callers(tmp_path, mode):
    fresh = tmp_path / "fresh"
    with output_dir.open_output_directory(str(fresh)) as out:
        assert out.write_all(writers(a=b"1", b=b"2")) == [str(fresh / "a"), str(fresh / "b")]
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 & ~current_umask()
    assert (fresh / "a").read_bytes() == b"1"
    for bits in (0o770, 0o707, 0o1777):
        os.chmod(fresh, bits)
        with pytest.raises(InvalidArgument, match="is writable by group or others"):
            output_dir.open_output_directory(str(fresh))
    os.chmod(fresh, 0o755)
    os.chown(fresh, NOBODY, NOBODY)
    with pytest.raises(InvalidArgument, match="owned by uid 65534, not by the caller"):
        output_dir.open_output_directory(str(fresh))
    with pytest.raises(InvalidArgument, match="does not exist"):
        output_dir.open_output_directory(str(tmp_path / "no" / "such"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_never_overwrites_and_leaves_nothing_on_failure(tmp_path, mode):
    out_dir = tmp_path / "out"
    out_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out_dir / "b").symlink_to(victim)
    with output_dir.open_output_directory(str(out_dir)) as out, \
            pytest.raises(InvalidArgument, match="out/b: already exists"):
        out.write_all(writers(a=b"1", b=b"2"))
    assert sorted(os.listdir(out_dir)) == ["b"] and victim.read_bytes() == b"precious"

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = tmp_path / "fresh"
    with output_dir.open_output_directory(str(fresh)) as out, \
            pytest.raises(InvalidArgument, match="cannot be written: No space left"):
        out.write_all([*writers(a=b"1"), ("b", fail)])
    assert not fresh.exists(), "a directory made for a failed write is removed again"


