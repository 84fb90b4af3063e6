"""Time `relaunchctl check --json` on this host (target: under 300 ms, issue #3).

Runs the CLI as a fresh process each time (interpreter start-up included, as an
admin or update tool sees it) and prints min/median/max. Read-only: the probe
only reads /proc, /sys, /boot (and /dev/mem or MSRs only on CPUs with SMX).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 15
TARGET_MS = 300.0


def main() -> int:
    cmd = [sys.executable, "-m", "relaunchd.cli", "check", "--json"]
    subprocess.run(cmd, capture_output=True, check=False)          # warm the page cache
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, check=False)
        times.append((time.perf_counter() - t0) * 1000)
        if p.returncode not in (0, 1):
            print(p.stderr.decode(), file=sys.stderr)
            return 2
    med = statistics.median(times)
    print(f"relaunchctl check --json: {RUNS} runs, min {min(times):.1f} ms, "
          f"median {med:.1f} ms, max {max(times):.1f} ms (target < {TARGET_MS:.0f} ms)")
    return 0 if med < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
