"""Shared by benchmarks/: timing children with wait4 and building a big UKI."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from . import ukibuild


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one child, measured with wait4."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss


def byte_compile_package() -> None:
    """Byte-compile relaunchd as its Debian package is at install (py3compile). The
    warm-up run cannot be relied on for that: with PYTHONDONTWRITEBYTECODE set (as in
    some shells and CI runners) no .pyc is ever written, and every timed run would
    compile the whole package from source (~15 ms of a 120 ms inspect)."""
    import compileall

    package = Path(__file__).resolve().parents[2] / "daemon" / "relaunchd"
    if not compileall.compile_dir(str(package), quiet=1):
        raise SystemExit(f"cannot byte-compile {package}")


def interleaved(cmds: list[list[str]], runs: int) -> list[tuple[float, int]]:
    """Median wall time and peak RSS of each command, the commands taking turns run by
    run, so a burst of noise on the machine hits ours and the reference alike instead
    of one whole series."""
    byte_compile_package()
    for cmd in cmds:
        timed(cmd)  # warm the page cache
    results: list[list[tuple[float, int]]] = [[] for _ in cmds]
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            results[i].append(timed(cmd))
    return [(statistics.median(r[0] for r in rs), max(r[1] for r in rs)) for rs in results]


def busy_cpus() -> float:
    """Load from other processes right now, to flag a noisy run."""
    return os.getloadavg()[0]


def big_uki(work: Path, initrd_mb: int) -> tuple[Path, dict[str, Path]]:
    """An unsigned UKI with a random initrd of `initrd_mb` MiB, and its parts."""
    kernel = ukibuild.debian_kernel()
    initrd = work / "initrd.img"
    with open(initrd, "wb") as f:
        for _ in range(initrd_mb):
            f.write(os.urandom(1 << 20))
    osrel = work / "os-release"
    osrel.write_bytes(ukibuild.OS_RELEASE)
    cmdline = work / "cmdline"
    cmdline.write_bytes(b"console=ttyS0 root=/dev/vda rw quiet")
    uki = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", osrel), (".cmdline", cmdline), (".initrd", initrd), (".linux", kernel.vmlinuz),
    ]), work / "big.efi")
    # objcopy stores each section exactly: the files are the measured images.
    return uki, {"linux": kernel.vmlinuz, "osrel": osrel, "cmdline": cmdline, "initrd": initrd}
