#!/usr/bin/env python3
"""`make demo`: build a real UKI and show what relaunchctl sees in it.

Until the VM relaunch lands, the demo builds a UKI from Debian 12's
systemd-stub and cloud kernel (with os-release, cmdline, uname, an initrd and
a real `.pcrsig`), signs it with a freshly generated test key, then runs
`relaunchctl inspect` and `relaunchctl verify` against the right and a wrong
certificate. Exit 0 only when every step behaved as it must.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import ukibuild

RELAUNCHCTL = str(Path(sys.executable).parent / "relaunchctl")


def step(title: str, cmd: list[str], want: int) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != want:
        sys.exit(f"demo: {title}: exit status {rc}, expected {want}")
    print(f"  -> exit {rc} ({title})", flush=True)


def main() -> int:
    print("relaunchd demo: building a real UKI from Debian's systemd-stub and kernel ...")
    kernel = ukibuild.debian_kernel()
    print(f"  kernel: {kernel.package} {kernel.version}")
    with tempfile.TemporaryDirectory(prefix="relaunchd-demo-") as tmp:
        work = Path(tmp)
        keys = {"db": ukibuild.make_signing_key(work, "db", "relaunchd demo db"),
                "other": ukibuild.make_signing_key(work, "other", "someone else")}
        ukis = ukibuild.build_test_set(work, kernel, keys)
        signed = str(ukis["signed"])
        step("inspect the signed UKI", [RELAUNCHCTL, "inspect", signed], 0)
        step("verify against the signing certificate",
             [RELAUNCHCTL, "verify", "--cert", str(keys["db"].cert), signed], 0)
        step("verify against an unrelated certificate must fail",
             [RELAUNCHCTL, "verify", "--cert", str(keys["other"].cert), signed], 1)
        step("a tampered image must fail verification",
             [RELAUNCHCTL, "verify", "--cert", str(keys["db"].cert), str(ukis["tampered"])], 1)
        step("profile 1 of a multi-profile UKI, as JSON",
             [RELAUNCHCTL, "inspect", "--json", "--profile", "1", "--bank", "sha256",
              str(ukis["multi"])], 0)
        bad = work / "truncated.efi"
        bad.write_bytes(Path(signed).read_bytes()[:100000])
        step("a truncated image is rejected with a named error",
             [RELAUNCHCTL, "inspect", str(bad)], 2)
    print("\ndemo: all steps behaved as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
