#!/usr/bin/env python3
"""Benchmark: downtime of a relaunch through relaunchd, in the QEMU guest of the vm tier.

One guest (TCG, 2 vCPUs, swtpm), relaunchd installed from its .deb and configured as in
tests/vm/test_service_relaunch.py (quiesce: offline CPU 1, unbind the virtio-rng PCI
function; metrics textfile). Each round, in this order:

  baseline    kexec -s -l of the guest's own kernel + initrd, `systemctl --no-block kexec`
  relaunchd   a signed UKI of the same kernel + initrd, staged with the D-Bus update tool
              (not timed), then the D-Bus Relaunch call (timed); LastRelaunch must be
              verified in the new boot
  reboot      `systemctl --no-block reboot` through the firmware: OVMF → systemd-boot →
              a UKI of the guest (default, --firmware ovmf: the guest boots that way
              from the start, as a UEFI server would), or SeaBIOS with QEMU's -kernel
              (--firmware seabios: the fastest firmware path there is)

Every transition is timed from the request to "new boot ready" (agent answers, systemd
finished starting) and split at console lines into shutdown, hand-over and boot.
Targets: median(relaunchd) − median(baseline) ≤ max(5 % of baseline, 1.0 s), also for
relaunchd's own measured work (Relaunch call until systemd starts the kexec job, plus the
shutdown hook's quiesce): TCG boot noise is several seconds, so the difference of totals
alone proves little; relaunchd < reboot.
Exit 0 even when a target is missed; 1 when a round errored or a relaunch was not proven.

Usage: .venv/bin/python benchmarks/downtime.py [--rounds N] [--firmware ovmf|seabios]
                                                [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import benchutil, ukibuild  # noqa: E402
from vm import guestsetup  # noqa: E402
from vm.deb import build_deb  # noqa: E402
from vm.guestsetup import BUS, IMAGES, rng_address  # noqa: E402
from vm.guestuki import guest_uki  # noqa: E402
from vm.image import GuestImage, guest_image, make_data_disk  # noqa: E402
from vm.machine import OVMF_CODE, OVMF_VARS, Boot, GuestError, Machine, MachineSpec  # noqa: E402
from vm.uefi import guest_uki as firmware_uki  # noqa: E402
from vm.uefi import make_esp  # noqa: E402

TOOLS = ("qemu-system-x86_64", "qemu-img", "swtpm", "mke2fs", "dpkg-buildpackage")
BOOT_TIMEOUT = 600
TRANSITION_TIMEOUT = 600
STAGE_TIMEOUT = 300

UKI = f"{IMAGES}/bench.efi"
CERT = "/etc/relaunchd/bench-db.pem"
KEXEC_LAST = "kexec_core: Starting new kernel"
REBOOT_LAST = "reboot: Restarting system"
NEW_KERNEL = "Linux version"

# The timed Relaunch call. It runs as a transient unit without default dependencies:
# the kexec job stops the agent's unit at once (Conflicts=shutdown.target), which
# would kill a caller in its cgroup before busctl returns; a DefaultDependencies=no
# unit lives until systemd-shutdown's final kill. SIGTERM is ignored for the same
# reason (and inherited by busctl). Start and result go to the kernel log, so they
# reach the serial console before the kexec; $EPOCHREALTIME avoids forking date(1).
RELAUNCH_CALL = f"""#!/bin/bash
trap '' TERM HUP
echo "<5>rld-bench: relaunch-call start" >/dev/kmsg
t0=$EPOCHREALTIME
out=$(busctl call {BUS} Relaunch 'a{{sv}}' 0 2>&1)
rc=$?
t1=$EPOCHREALTIME
us=$(( ${{t1/./}} - ${{t0/./}} ))
out=${{out//$'\\n'/ }}
echo "<5>rld-bench: relaunch-call rc=$rc us=$us out=${{out:0:200}}" >/dev/kmsg
""".encode()
CALL_START = "rld-bench: relaunch-call start"
# systemd's first status line of the kexec.target transaction: the hand-off is done.
JOB_QUEUED = "Stopping "
CALL_LINE = re.compile(r"rld-bench: relaunch-call rc=(\d+) us=(\d+) out=(.*)")
HOOK_LINE = re.compile(r"relaunchd-shutdown: relaunch (\S+): quiesced in (\d+) ms: (.*)")
USERSPACE = re.compile(r"\+ ([\d.]+)(min|s|ms) \(userspace\)")

SCENARIOS = {"baseline": "baseline kexec", "relaunchd": "relaunchd",
             "reboot": "firmware reboot"}
# (key, label, scenarios that have it)
ROWS = [
    ("total", "request → ready (total)", SCENARIOS),
    ("shutdown", "  shutdown: → old kernel's last line", SCENARIOS),
    ("handover", "  hand-over: → new 'Linux version'", SCENARIOS),
    ("boot", "  boot: → ready", SCENARIOS),
    ("userspace", "  of which userspace (systemd-analyze)", SCENARIOS),
    ("without_userspace", "total − userspace (less noisy)", SCENARIOS),
    ("service_stop", "relaunchd.service stop (old boot)", SCENARIOS),
    ("service_start", "relaunchd.service start (new boot)", SCENARIOS),
    ("call", "relaunchd: Relaunch call → kexec job", ("relaunchd",)),
    ("hook", "relaunchd: shutdown hook quiesce", ("relaunchd",)),
    ("own_work", "relaunchd: own work (sum of the two)", ("relaunchd",)),
    ("call_return", "relaunchd: busctl Relaunch returned", ("relaunchd",)),
    ("reported_downtime", "relaunchd: LastRelaunch.downtime_ms", ("relaunchd",)),
]


@dataclass
class Transition:
    figures: dict[str, float] = field(default_factory=dict)  # seconds
    errors: list[str] = field(default_factory=list)      # the round failed
    warnings: list[str] = field(default_factory=list)    # a figure is missing
    info: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and "total" in self.figures


def log(msg: str) -> None:
    print(f"[downtime] {msg}", file=sys.stderr, flush=True)


def console_line(guest: Machine, pattern: re.Pattern[str], after: float
                 ) -> tuple[float, re.Match[str]] | None:
    for t, line in list(guest.console):
        if t >= after and (m := pattern.search(line)):
            return t, m
    return None


def record_phases(guest: Machine, boot: Boot, last_line: str, tr: Transition) -> None:
    """Split request → ready at the old kernel's last console line and the new
    kernel's first ("Linux version"), as tests/vm/test_relaunch.py does."""
    tr.figures["total"] = boot.seconds
    down = guest.console_time(last_line, boot.since)
    up = guest.console_time(NEW_KERNEL, down) if down is not None else None
    if down is None or up is None:
        missing = last_line if down is None else NEW_KERNEL
        tr.warnings.append(f"console line {missing!r} not found: no phases")
        return
    tr.figures.update(shutdown=down - boot.since, handover=up - down, boot=boot.ready - up)
    # relaunchd's own unit on both sides, from systemd's status lines: stopping it in the
    # old boot (it drains the Relaunch reply), starting it in the new one (where it proves
    # a pending relaunch before READY=1). In the baseline and reboot rounds it runs too,
    # with nothing to prove: the difference is relaunchd's cost.
    for key, begin, end, after in (
            ("service_stop", "Stopping relaunchd.service", "Stopped relaunchd.service",
             boot.since),
            ("service_start", "Starting relaunchd.service", "Started relaunchd.service", up)):
        t0 = guest.console_time(begin, after)
        t1 = guest.console_time(end, t0) if t0 is not None else None
        if t0 is not None and t1 is not None:
            tr.figures[key] = t1 - t0
    # Userspace start is where TCG noise lives; say how much of "boot" it is.
    analyze = guest.run("systemd-analyze time", check=False).output
    if m := USERSPACE.search(analyze):
        scale = {"min": 60.0, "s": 1.0, "ms": 0.001}[m.group(2)]
        tr.figures["userspace"] = float(m.group(1)) * scale
        tr.figures["without_userspace"] = boot.seconds - tr.figures["userspace"]


def configure(guest: Machine, cert: Path) -> str:
    """relaunchd as test_service_relaunch.py's `service` fixture sets it up."""
    rng = rng_address(guest)
    guestsetup.configure(guest, cert=cert, cert_path=CERT, written_by="benchmarks/downtime.py",
                         unbind=(rng,))
    guest.put("/usr/local/sbin/rld-bench-relaunch", RELAUNCH_CALL, mode=0o755)
    return rng


def baseline(guest: Machine, release: str, tag: str) -> Transition:
    tr = Transition()
    marker = f"rld.bench=baseline-{tag}"
    guest.run(f"kexec -s -l /boot/vmlinuz-{release} --initrd=/boot/initrd.img-{release} "
              f"--append=\"$(cat /proc/cmdline) {marker}\"")
    if guest.run("cat /sys/kernel/kexec_loaded").output.strip() != "1":
        tr.errors.append("kexec -s -l did not load a kernel")
        return tr
    boot = guest.transition("systemctl --no-block kexec", timeout=TRANSITION_TIMEOUT)
    record_phases(guest, boot, KEXEC_LAST, tr)
    if marker not in guest.run("cat /proc/cmdline").output.split():
        tr.errors.append(f"{marker} not on the new command line: not a kexec boot")
    return tr


def relaunch(guest: Machine, rng: str) -> Transition:
    tr = Transition()
    relaunch_id = guest.run(f"rld-update {UKI}", timeout=STAGE_TIMEOUT).output.strip()
    tr.info["id"] = relaunch_id
    boot = guest.transition("systemd-run --no-block --collect --quiet "
                            "--unit=rld-bench-relaunch -p DefaultDependencies=no "
                            "/usr/local/sbin/rld-bench-relaunch",
                            timeout=TRANSITION_TIMEOUT)
    record_phases(guest, boot, KEXEC_LAST, tr)

    # The call's own work ends when systemd starts the kexec.target transaction (its
    # first "Stopping" line); busctl itself only returns once the daemon is stopped.
    # Both lines' host arrival times (±50 ms) on the same serial console.
    start = guest.console_time(CALL_START, boot.since)
    job = guest.console_time(JOB_QUEUED, start) if start is not None else None
    if start is not None and job is not None:
        tr.figures["call"] = job - start
    else:
        tr.warnings.append(f"console line {CALL_START if start is None else JOB_QUEUED!r} "
                           "not found: no Relaunch call figure")
    if found := console_line(guest, CALL_LINE, boot.since):
        rc, us, out = found[1].groups()
        tr.figures["call_return"] = int(us) / 1e6
        tr.info["call_output"] = out.strip()
        if rc != "0":
            tr.warnings.append(f"busctl Relaunch exited {rc}: {out.strip()}")
    else:
        tr.warnings.append("console line 'rld-bench: relaunch-call' not found")
    if found := console_line(guest, HOOK_LINE, boot.since):
        hook_id, ms, done = found[1].groups()
        tr.figures["hook"] = int(ms) / 1000
        tr.info["quiesced"] = done
        if hook_id != relaunch_id or "cpu-offline 1" not in done or rng not in done:
            tr.errors.append(f"the hook quiesced something else: {found[1].group(0)}")
    else:
        tr.errors.append("console line 'relaunchd-shutdown: relaunch ...: quiesced in' "
                         "not found: the shutdown hook did not quiesce")
    if "call" in tr.figures and "hook" in tr.figures:
        tr.figures["own_work"] = tr.figures["call"] + tr.figures["hook"]

    last = json.loads(guest.run("relaunchctl status --json").output).get("LastRelaunch") or {}
    tr.info["last_relaunch"] = {k: last.get(k) for k in (
        "id", "verified", "mismatches", "downtime_ms", "phases", "boot_id",
        "previous_boot_id")}
    if last.get("id") != relaunch_id or last.get("verified") is not True:
        tr.errors.append(f"LastRelaunch not verified for {relaunch_id}: id={last.get('id')} "
                         f"verified={last.get('verified')} mismatches={last.get('mismatches')}")
    if isinstance(last.get("downtime_ms"), int | float):
        tr.figures["reported_downtime"] = last["downtime_ms"] / 1000
    return tr


def reboot(guest: Machine) -> Transition:
    tr = Transition()
    boot = guest.transition("systemctl --no-block reboot", timeout=TRANSITION_TIMEOUT)
    record_phases(guest, boot, REBOOT_LAST, tr)
    if "rld.bench=" in guest.run("cat /proc/cmdline").output:
        tr.errors.append("the command line still has a benchmark marker: not a firmware boot")
    return tr


def run_rounds(image: GuestImage, rounds: int, work: Path, firmware: str
               ) -> tuple[list[dict], str | None]:
    key = ukibuild.make_signing_key(work, "db", "relaunchd downtime bench")
    # The guest's own kernel + initrd with the default rdinit probe (it execs /init).
    uki = guest_uki(image, {"db": key}, work, f"rld.bench=relaunchd-{uuid.uuid4().hex[:8]}",
                    "bench")
    data = make_data_disk({"relaunchd.deb": build_deb()}, work / "data.img")
    results: list[dict] = []
    # no_reboot=False: the firmware reboot must not end QEMU. The lifetime is bounded
    # by what the rounds may take at their timeouts' worst.
    # With OVMF every boot, the first and each firmware reboot, goes OVMF → systemd-boot →
    # a UKI of the guest's kernel, initrd and command line (tests/vm/uefi.py).
    esp = (make_esp(firmware_uki(image, work / "firmware.efi"), work / "esp")
           if firmware == "ovmf" else None)
    spec = MachineSpec(image, data_disk=data, no_reboot=False, esp=esp,
                       max_lifetime=20 * 60 + rounds * 3 * TRANSITION_TIMEOUT)
    with Machine(spec) as guest:
        try:
            first = guest.boot(timeout=BOOT_TIMEOUT)
            log(f"guest ready after {first.seconds:.1f} s")
            rng = configure(guest, key.cert)
            guest.put(UKI, uki)  # once: staging reads it afresh every round
            release = guest.run("uname -r").output.strip()
        except GuestError as exc:
            return results, f"setting up the guest: {exc}"
        for n in range(1, rounds + 1):
            row: dict[str, Transition] = {}
            results.append({"round": n, "transitions": row})
            try:
                for name in SCENARIOS:
                    log(f"round {n}/{rounds}: {name}")
                    if name == "baseline":
                        row[name] = baseline(guest, release, f"{n}-{uuid.uuid4().hex[:8]}")
                    elif name == "relaunchd":
                        row[name] = relaunch(guest, rng)
                    else:
                        row[name] = reboot(guest)
                    tr = row[name]
                    log(f"  total {tr.figures.get('total', float('nan')):.1f} s"
                        + "".join(f"; ERROR {e}" for e in tr.errors)
                        + "".join(f"; warning {w}" for w in tr.warnings))
            except GuestError as exc:
                # The guest's state is unknown after a failed transition: stop here.
                return results, f"round {n}: {exc}"
        guest.poweroff()
    return results, None


def summarize(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for scenario in SCENARIOS:
        for key, _, where in ROWS:
            if scenario not in where:
                continue
            values = [r["transitions"][scenario].figures[key] for r in results
                      if scenario in r["transitions"] and r["transitions"][scenario].ok
                      and key in r["transitions"][scenario].figures]
            if values:
                summary.setdefault(scenario, {})[key] = {
                    "median": statistics.median(values), "min": min(values),
                    "max": max(values), "n": len(values)}
    return summary


def cell(stat: dict[str, float] | None) -> str:
    if not stat:
        return "—"
    if stat["n"] == 1:
        return f"{stat['median']:.2f}"
    return f"{stat['median']:.2f} [{stat['min']:.2f}–{stat['max']:.2f}]"


def report(summary: dict, rounds: int, firmware: str) -> dict[str, dict]:
    width = max(len(label) for _, label, _ in ROWS)
    print(f"\nrelaunch downtime in the guest (TCG, 2 vCPUs, firmware {firmware}), "
          f"{rounds} round(s): seconds, median [min–max]")
    print(f"  {'':<{width}}" + "".join(f"  {title:>22}" for title in SCENARIOS.values()))
    for key, label, where in ROWS:
        cells = [cell(summary.get(s, {}).get(key)) if s in where else ""
                 for s in SCENARIOS]
        print(f"  {label:<{width}}" + "".join(f"  {c:>22}" for c in cells))

    def med(scenario: str, key: str) -> float | None:
        stat = summary.get(scenario, {}).get(key)
        return stat["median"] if stat else None

    verdicts: dict[str, dict] = {}
    base, rld, rb = med("baseline", "total"), med("relaunchd", "total"), med("reboot", "total")
    own = med("relaunchd", "own_work")
    print()
    if base is None or rld is None:
        print("  overhead vs. baseline kexec: no figures  MISS")
        verdicts["overhead"] = {"pass": False}
    else:
        target = max(0.05 * base, 1.0)
        overhead = rld - base
        ok = overhead <= target
        print(f"  overhead = median relaunchd − median baseline = {rld:.2f} − {base:.2f} = "
              f"{overhead:+.2f} s  (target ≤ {target:.2f} s = max(5 % of baseline, 1.0 s))"
              f"  {'PASS' if ok else 'MISS'}")
        verdicts["overhead"] = {"seconds": overhead, "target": target, "pass": ok}
        if own is not None:
            ok = own <= target
            print(f"  relaunchd's own work (Relaunch call → kexec job, + shutdown hook), "
                  f"median = {own:.2f} s  (same target; the direct figure)  "
                  f"{'PASS' if ok else 'MISS'}")
            verdicts["own_work"] = {"seconds": own, "target": target, "pass": ok}
        # Say where the noise is: the phase whose figures vary most between rounds.
        spreads = [(st["max"] - st["min"], scenario, key)
                   for scenario in ("baseline", "relaunchd")
                   for key, st in summary.get(scenario, {}).items()
                   if key in ("total", "shutdown", "handover", "boot")]
        total = max((x for x in spreads if x[2] == "total"), default=None)
        phase = max((x for x in spreads if x[2] != "total"), default=None)
        if total and phase:
            print(f"  (TCG noise: a total varies by up to {total[0]:.1f} s between rounds, "
                  f"most in {phase[1]} {phase[2]} ({phase[0]:.1f} s); the difference of "
                  "totals is only as good as that)")
    if rld is None or rb is None:
        print("  relaunchd < firmware reboot: no figures  MISS")
        verdicts["faster_than_reboot"] = {"pass": False}
    else:
        ok = rld < rb
        print(f"  relaunchd {rld:.2f} s < firmware reboot {rb:.2f} s  "
              f"{'PASS' if ok else 'MISS'}")
        verdicts["faster_than_reboot"] = {"relaunchd": rld, "reboot": rb, "pass": ok}
    return verdicts


def qemu_running() -> int:
    """Other TCG guests on this host (comm is cut to 15 characters)."""
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            count += comm.read_text().strip() == "qemu-system-x86"
        except OSError:
            continue
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--firmware", choices=("ovmf", "seabios"), default="ovmf",
                        help="how the guest boots and reboots (default: ovmf)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if missing := [t for t in TOOLS if not shutil.which(t)]:
        print(f"downtime: needs {', '.join(missing)}: run `make setup`", file=sys.stderr)
        return 1
    if args.firmware == "ovmf" and not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        print(f"downtime: --firmware ovmf needs {OVMF_CODE} and {OVMF_VARS} (package ovmf): "
              "run `make setup`", file=sys.stderr)
        return 1
    load_before, others = benchutil.busy_cpus(), qemu_running()
    if others:
        log(f"warning: {others} other QEMU process(es) running: TCG figures will be skewed")
    image = guest_image()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relaunchd-downtime-") as tmp:
        try:
            results, error = run_rounds(image, args.rounds, Path(tmp), args.firmware)
        except RuntimeError as exc:  # GuestError at QEMU start, build-deb, mke2fs
            results, error = [], f"before the first round: {exc}"
    log(f"done in {time.monotonic() - started:.0f} s")

    summary = summarize(results)
    verdicts = report(summary, len(results), args.firmware)
    failed = [f"round {r['round']} {name}: {e}" for r in results
              for name, tr in r["transitions"].items() for e in tr.errors]
    warned = [f"round {r['round']} {name}: {w}" for r in results
              for name, tr in r["transitions"].items() for w in tr.warnings]
    if error:
        failed.append(error)
    print(f"  load average: {load_before:.2f} before, {benchutil.busy_cpus():.2f} after"
          + (f"; {others} other QEMU running at the start" if others else ""))
    for w in warned:
        print(f"  warning: {w}")
    for f in failed:
        print(f"  FAILED: {f}")

    if args.json:
        args.json.write_text(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "cpus": os.cpu_count(), "image": image.key,
            "firmware": args.firmware,
            "rounds": [{"round": r["round"], **{
                name: {"figures": tr.figures, "errors": tr.errors, "warnings": tr.warnings,
                       "info": tr.info} for name, tr in r["transitions"].items()}}
                for r in results],
            "summary": summary, "verdicts": verdicts, "failed": failed,
            "load_average": [load_before, benchutil.busy_cpus()],
        }, indent=1, default=str) + "\n")
        print(f"  figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
