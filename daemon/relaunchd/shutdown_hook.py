"""The system-shutdown hook: quiesce right before systemd-shutdown jumps to the new kernel.

Installed as /usr/lib/systemd/system-shutdown/relaunchd. systemd-shutdown runs every
executable there with argv[1] = "halt" | "poweroff" | "reboot" | "kexec", after all
services are stopped and file systems are unmounted or read-only, just before the
reboot(2) call (systemd-shutdown(8), "Immediately before executing the actual system
halt/poweroff/reboot/kexec"). /run and /sys are still there (API file systems).

It acts only when all of these hold, else it does nothing and says why:
- argv[1] is "kexec";
- relaunchd's hand-off marker (runtime dir, handoff.json) names a relaunch — so a
  `systemctl kexec` nobody asked relaunchd for is left alone;
- the staged record has that id and the kernel still has a kexec image loaded;
- the quiesce plan of the staged image is there and has that id.

Then it executes the plan with the journal-before-action rules of `quiesce`; a failing
step is rolled back and reported (the kexec still happens: systemd-shutdown does not ask
us, and the kernel's own kexec path stops the devices and CPUs anyway). Messages go to
the kernel log (/dev/kmsg): the journal is already gone, the console and the next
kernel's pstore/serial logs are not.
"""

from __future__ import annotations

import json
import os
import sys
import time

from relaunchd.engine.state import HANDOFF, QUIESCE_JOURNAL, QUIESCE_PLAN, STAGED
from relaunchd.errors import InvalidArgument, QuiesceFailed
from relaunchd.platform.quiesce import QuiescePlan, execute
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import SysWriter

DEFAULT_RUNTIME_DIR = "/run/relaunchd"
CONFIG = "/etc/relaunchd/relaunchd.yaml"
KEXEC_LOADED = "/sys/kernel/kexec_loaded"


def _say(message: str, level: int = 5) -> None:
    line = f"<{level}>relaunchd-shutdown: {message}\n".encode(errors="replace")
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line[:1000])
        finally:
            os.close(fd)
    except OSError:
        sys.stderr.write(line.decode(errors="replace")[3:])


def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _runtime_dir(config_path: str) -> str:
    """The configured runtime directory; the default when the file is absent or bad (the
    daemon refused a bad file at start, so nothing of ours would be staged then)."""
    try:
        from relaunchd.engine.config_file import load_config

        return load_config(config_path).runtime_dir
    except Exception:
        return DEFAULT_RUNTIME_DIR


def run(verb: str, runtime_dir: str, root: str = "/") -> int:
    if verb != "kexec":
        return 0
    marker = _read_json(os.path.join(runtime_dir, HANDOFF))
    if marker is None:
        try:
            present = ", ".join(sorted(os.listdir(runtime_dir))) or "empty"
        except OSError as exc:
            present = exc.strerror or str(exc)
        _say(f"no relaunch handed off ({os.path.join(runtime_dir, HANDOFF)} absent; "
             f"{runtime_dir}: {present}): not relaunchd's kexec, nothing to do", 6)
        return 0
    ident = str(marker.get("id", ""))
    staged = _read_json(os.path.join(runtime_dir, STAGED)) or {}
    sysroot = SysRoot(root)
    loaded = sysroot.read_line(KEXEC_LOADED)
    if staged.get("id") != ident or not (loaded.ok and loaded.value == "1"):
        _say(f"relaunch {ident}: staged record {staged.get('id')!r}, kexec_loaded "
             f"{loaded.value if loaded.ok else 'unreadable'}: not quiescing", 4)
        return 0
    saved = _read_json(os.path.join(runtime_dir, QUIESCE_PLAN)) or {}
    if saved.get("id") != ident:
        _say(f"relaunch {ident}: no quiesce plan for it; not quiescing", 4)
        return 0
    try:
        plan = QuiescePlan.from_json(json.dumps(saved.get("plan")))
    except InvalidArgument as exc:
        _say(f"relaunch {ident}: unusable quiesce plan: {exc}; not quiescing", 3)
        return 1
    started = time.monotonic()
    try:
        report = execute(plan, sysroot, SysWriter(root, allow_live=root == "/"),
                         os.path.join(runtime_dir, QUIESCE_JOURNAL))
    except QuiesceFailed as exc:
        _say(f"relaunch {ident}: quiesce failed: {exc}", 3)
        return 1
    done = ", ".join(f"{e.action} {e.target}" for e in report.done) or "nothing to do"
    _say(f"relaunch {ident}: quiesced in {(time.monotonic() - started) * 1000:.0f} ms: "
         f"{done}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: relaunchd-shutdown-hook halt|poweroff|reboot|kexec", file=sys.stderr)
        return 2
    try:
        return run(args[0], _runtime_dir(CONFIG))
    except Exception as exc:    # never a traceback on the console in the last second
        _say(f"internal error: {type(exc).__name__}: {exc}", 3)
        return 1


if __name__ == "__main__":
    sys.exit(main())
