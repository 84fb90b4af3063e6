"""Unprivileged callers flooding relaunchd while root stages and cancels (issue #14, item
3): shared by benchmarks/bus_starvation.py and tests/integration/test_security_bus.py.

Each flooder is Debian's python3 with GLib only, run as `nobody` (runuser): it keeps
`in_flight` calls of one method outstanding on its own connection — a new one as each
reply arrives — until a stop file appears, then waits for the replies still due and prints
what it got (answered, Busy, other errors; reply latencies). The admin is this process
(root): Stage, wait for `staged`, Cancel, wait for `idle`, timing each call.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from relaunchd.bus import client as bus_client
from support.dbus_harness import PrivateBus

FLOODER = r"""
import json, os, sys, time
from gi.repository import Gio, GLib
address, method, in_flight, stop_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
con = Gio.DBusConnection.new_for_address_sync(
    address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
loop = GLib.MainLoop()
counts = {"answered": 0, "busy": 0, "other": 0}
errors, latencies, state = {}, [], {"pending": 0, "stopping": False}

def send():
    state["pending"] += 1
    con.call("org.relaunchd.Relaunch1", "/org/relaunchd/Relaunch1",
             "org.relaunchd.Relaunch1.Manager", method, GLib.Variant("(a{sv})", ({},)),
             None, Gio.DBusCallFlags.NONE, 120000, None, done, time.perf_counter())

def done(c, result, sent):
    state["pending"] -= 1
    try:
        c.call_finish(result)
        counts["answered"] += 1
    except GLib.Error as exc:
        name = Gio.DBusError.get_remote_error(exc) or exc.message
        kind = "busy" if name.endswith(".Busy") else "other"
        counts[kind] += 1
        if kind == "other":
            errors[name] = errors.get(name, 0) + 1
    latencies.append(time.perf_counter() - sent)
    if not state["stopping"]:
        send()
    elif state["pending"] == 0:
        loop.quit()

def poll():
    if os.path.exists(stop_file):
        state["stopping"] = True
        if state["pending"] == 0:
            loop.quit()
        return False
    return True

for _ in range(in_flight):
    send()
GLib.timeout_add(100, poll)
loop.run()
latencies.sort()
print(json.dumps({"counts": counts, "errors": errors, "calls": len(latencies),
                  "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0}))
"""


@dataclass
class Flood:
    """Flooder processes running as `user`; stop() collects what each got."""

    procs: list[subprocess.Popen]
    stop_file: Path
    started: float = field(default_factory=time.monotonic)

    def stop(self, timeout: float = 180) -> list[dict]:
        self.stop_file.touch()
        results = []
        for proc in self.procs:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=10)
            if proc.returncode != 0:
                raise RuntimeError(f"flooder exited {proc.returncode}: {err}")
            results.append(json.loads(out))
        return results

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def start_flood(bus: PrivateBus, *, callers: int, in_flight: int, method: str = "Check",
                user: str = "nobody", nice: int = 0) -> Flood:
    """`nice` > 0 runs the flooders at a lower CPU priority: on a real system they would
    be in user.slice and relaunchd in system.slice, whose CPU shares cgroups keep apart;
    here everything is in one cgroup."""
    stop_file = bus.dir / f"stop-flood-{time.monotonic_ns()}"
    env = {**bus.env(), "PYTHONPATH": ""}
    procs = [subprocess.Popen(["nice", "-n", str(nice), "runuser", "-u", user, "--",
                               "/usr/bin/python3", "-c", FLOODER,
                               bus.address, method, str(in_flight), str(stop_file)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd="/")
             for _ in range(callers)]
    return Flood(procs, stop_file)


@dataclass
class AdminRounds:
    stage_s: list[float] = field(default_factory=list)
    cancel_s: list[float] = field(default_factory=list)

    @property
    def all_s(self) -> list[float]:
        return sorted(self.stage_s + self.cancel_s)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction + 0.5) - 1)] if ordered else 0.0


def admin_rounds(bus: PrivateBus, image: str, rounds: int, *,
                 state_timeout: float = 300) -> AdminRounds:
    """As root: `rounds` times Stage `image`, wait for staged, Cancel, wait for idle."""
    client = bus_client.Client(address=bus.address, timeout_ms=300_000)
    times = AdminRounds()
    for _ in range(rounds):
        started = time.perf_counter()
        ident = client.call("Stage", image)
        times.stage_s.append(time.perf_counter() - started)
        _wait(client, lambda p, ident=ident: p["State"] == "staged"
              and p["StagedImage"].get("id") == ident, state_timeout)
        started = time.perf_counter()
        client.call("Cancel")
        times.cancel_s.append(time.perf_counter() - started)
        _wait(client, lambda p: p["State"] == "idle", state_timeout)
    return times


def _wait(client, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        props = client.properties()
        if predicate(props):
            return props
        if props["State"] == "failed":
            raise RuntimeError(f"staging failed: {props['LastError']}")
        time.sleep(0.02)
    raise TimeoutError(f"state not reached in {timeout} s")
