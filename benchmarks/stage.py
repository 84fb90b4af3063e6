#!/usr/bin/env python3
"""Benchmark: `relaunchctl stage --dry-run` of a signed UKI with a ~100 MB initrd.

Staging copies the image into a sealed memfd, verifies its signature, hashes
every section, cuts the kernel and builds the initrd in sealed memfds. Compared
in the same run (median of N warm runs) with `openssl dgst -sha256` of the
file. Targets: at most 2x openssl; peak RSS under 150 MB.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--initrd-mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relaunchd-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        images = work / "images"
        images.mkdir(mode=0o755)
        image, _ = big_uki(work, args.initrd_mb)
        key = ukibuild.make_signing_key(work, "db", "relaunchd bench")
        signed = ukibuild.sign(image, key, images / "big.efi")
        (t_ssl, _), (t_stage, rss) = interleaved([
            ["/usr/bin/openssl", "dgst", "-sha256", str(signed)],
            [str(RELAUNCHCTL), "stage", "--dry-run", "--image-dir", str(images),
             "--cert", str(key.cert), str(signed)]], args.runs)
        if busy_cpus() > 0.5:
            print(f"warning: load average {busy_cpus():.1f}: other processes may skew this run")
        ratio = t_stage / t_ssl
        peak = rss / 1024
        ok = ratio <= 2.0 and peak < 150
        print(f"stage --dry-run: {signed.stat().st_size / 1e6:.1f} MB signed UKI, "
              f"{os.cpu_count()} CPUs, median of {args.runs} warm runs")
        print(f"  stage / openssl dgst -sha256   {t_stage * 1000:7.0f} ms / {t_ssl * 1000:7.0f} ms"
              f" = {ratio:4.2f}x  (target <= 2x) {'ok' if ratio <= 2.0 else 'MISSED'}")
        print(f"  peak RSS                       {peak:7.1f} MB"
              f"{'':>19}(target < 150 MB) {'ok' if peak < 150 else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
