#!/usr/bin/env python3
"""Benchmark: `relaunchctl inspect` on a UKI with a ~100 MB initrd.

Compared in the same run, page cache warm, median of N runs taken in turns:
  - all four banks: `relaunchctl inspect --json`  vs  `systemd-measure calculate`
    (all four banks, same extracted sections)        target ≤ 0.8×
  - sha256 only:    `relaunchctl inspect --json --bank sha256`  vs
    `openssl dgst -sha256` of the file               target ≤ 1.5×
  - peak RSS of relaunchctl                          target < 120 MB

Usage: benchmarks/inspect_uki.py [--runs N] [--initrd-mb M]
Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import ukibuild  # noqa: E402
from support.benchutil import big_uki, busy_cpus, interleaved  # noqa: E402

RELAUNCHCTL = REPO / ".venv" / "bin" / "relaunchctl"
BANKS = ["sha1", "sha256", "sha384", "sha512"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--initrd-mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relaunchd-bench-") as tmp:
        image, parts = big_uki(Path(tmp), args.initrd_mb)
        key = ukibuild.make_signing_key(Path(tmp), "db", "relaunchd bench")
        signed = ukibuild.sign(image, key, Path(tmp) / "big.signed.efi")
        size_mb = image.stat().st_size / 1e6
        measure_cmd = ["/usr/lib/systemd/systemd-measure", "calculate",
                       *[f"--{k}={v}" for k, v in parts.items()],
                       *[f"--bank={b}" for b in BANKS]]
        rows = []
        # Ours and the references take turns, run by run (benchutil.interleaved).
        (t_sm, _), (t_all, rss_all), (t_ssl, _), (t_256, rss_256), (t_all_s, rss_all_s), \
            (t_256_s, rss_256_s) = interleaved([
                measure_cmd,
                [str(RELAUNCHCTL), "inspect", "--json", str(image)],
                ["/usr/bin/openssl", "dgst", "-sha256", str(image)],
                [str(RELAUNCHCTL), "inspect", "--json", "--bank", "sha256", str(image)],
                [str(RELAUNCHCTL), "inspect", "--json", str(signed)],
                [str(RELAUNCHCTL), "inspect", "--json", "--bank", "sha256", str(signed)],
            ], args.runs)
        rows.append(("all banks: inspect / systemd-measure", t_all, t_sm, 0.8))
        rows.append(("sha256: inspect / openssl dgst", t_256, t_ssl, 1.5))
        if busy_cpus() > 0.5:
            print(f"warning: load average {busy_cpus():.1f}: other processes may skew this run")
        print(f"UKI: {size_mb:.1f} MB (initrd {args.initrd_mb} MiB, unsigned), "
              f"{os.cpu_count()} CPUs, median of {args.runs} warm runs")
        ok = True
        for label, ours, ref, target in rows:
            ratio = ours / ref
            verdict = "ok" if ratio <= target else "MISSED"
            ok &= ratio <= target
            print(f"  {label:<40} {ours * 1000:7.0f} ms / {ref * 1000:7.0f} ms = "
                  f"{ratio:4.2f}x  (target <= {target}x) {verdict}")
        print("  signed copy (adds the Authenticode SHA-256 pass and the crypto imports;"
              " no reference does this work):")
        print(f"    all banks {t_all_s * 1000:7.0f} ms ({t_all_s / t_sm:4.2f}x systemd-measure), "
              f"sha256 {t_256_s * 1000:7.0f} ms ({t_256_s / t_ssl:4.2f}x openssl)")
        peak = max(rss_all, rss_256, rss_all_s, rss_256_s) / 1024
        verdict = "ok" if peak < 120 else "MISSED"
        ok &= peak < 120
        print(f"  {'peak RSS of relaunchctl inspect':<40} {peak:7.1f} MB"
              f"{'':>21}(target < 120 MB) {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
