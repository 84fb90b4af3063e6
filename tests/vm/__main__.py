"""`PYTHONPATH=tests python -m vm COMMAND` — the guest by hand (see docs/vm.md).

  image [--rebuild]   build (or find) the cached guest image, print where it is
  shell               boot the guest with relaunchd installed; root shell on the
                      serial console (Ctrl-A X quits QEMU, or `poweroff`)
  run CMD...          boot, run one command, print its output, power off
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from .deb import build_deb
from .image import guest_image, make_data_disk
from .machine import GuestError, Machine, MachineSpec

SHELL_LIFETIME = float(os.environ.get("RELAUNCHD_VM_SHELL_HOURS", "4")) * 3600


def _data_disk(directory: Path) -> Path:
    files: dict[str, Path | bytes] = {"relaunchd.deb": build_deb()}
    extra = os.environ.get("RELAUNCHD_VM_FILES", "")  # colon-separated host paths
    for name in filter(None, extra.split(":")):
        files[Path(name).name] = Path(name)
    return make_data_disk(files, directory / "data.img")


def shell() -> int:
    image = guest_image()
    with tempfile.TemporaryDirectory(prefix="rld-shell-") as tmp:
        data = _data_disk(Path(tmp))
        print("relaunchd guest: serial console below; root logs in by itself.\n"
              "relaunchd is installed from its .deb at boot, test files are in /srv/rld.\n"
              "Leave with `poweroff` in the guest, or Ctrl-A X.", file=sys.stderr)
        spec = MachineSpec(image, data_disk=data, no_reboot=False, console_stdio=True,
                           max_lifetime=SHELL_LIFETIME)
        with Machine(spec) as machine:
            try:
                return machine.wait_exit(SHELL_LIFETIME)
            except GuestError:
                print(f"vm-shell: lifetime of {SHELL_LIFETIME:.0f} s reached, killing QEMU",
                      file=sys.stderr)
                return 1
    return 0


def run(command: str) -> int:
    image = guest_image()
    with tempfile.TemporaryDirectory(prefix="rld-run-") as tmp:
        data = _data_disk(Path(tmp))
        with Machine(MachineSpec(image, data_disk=data)) as machine:
            boot = machine.boot()
            print(f"[vm] ready after {boot.seconds:.1f} s ({boot.state})", file=sys.stderr)
            result = machine.run(command, timeout=600, check=False)
            sys.stdout.write(result.output)
            machine.poweroff()
            return result.rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "image":
        img = guest_image(rebuild="--rebuild" in argv)
        print(json.dumps({"directory": str(img.directory), "release": img.release,
                          "key": img.key, "build_seconds": img.build_seconds}, indent=1))
        return 0
    if argv[0] == "shell":
        return shell()
    if argv[0] == "run" and len(argv) > 1:
        return run(" ".join(argv[1:]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
