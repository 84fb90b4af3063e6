"""`relaunchctl relaunch [--wait] [--force] [--fallback none|reboot] [--immediate | --rehearse]`.

Relaunch into the staged image. With --wait it returns only when the system is going
down — exit 0 — or the relaunch failed — exit 1; so it can be kured's --reboot-command
or Ansible's reboot_command. Going down is relaunchd reaching `relaunching`, or systemd
stopping once relaunchd has left the bus or this command got SIGTERM/SIGHUP (the same
shutdown stops the caller's SSH session or pod), whichever comes first
(busclient.wait_relaunch).
--rehearse performs the quiesce plan on the live system, checks it and rolls it back:
exit 0 when everything was as before afterwards, 1 otherwise.
"""

from __future__ import annotations

import argparse
import signal

from relaunchd.cli import EXIT_FAILED, EXIT_OK
from relaunchd.cli.busclient import (
    Termination,
    connect,
    handled,
    interactive,
    read_properties,
    wait_relaunch,
)
from relaunchd.cli.output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("relaunch", help="relaunch into the staged image (D-Bus)",
                                   description="Measure, quiesce and hand off to the staged "
                                               "kernel.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--wait", action="store_true",
                        help="block until the system goes down (0) or the relaunch fails (1)")
    parser.add_argument("--force", action="store_true",
                        help="relaunch even if inhibitors or readiness checks object")
    parser.add_argument("--fallback", choices=("none", "reboot"),
                        help="when the relaunch cannot happen (nothing staged, method not "
                             "ready, hand-off refused): fail (none) or do an ordinary "
                             "reboot instead (reboot); default: launch.fallback")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--immediate", action="store_true",
                     help="quiesce and kexec at once, without stopping services "
                          "(filesystems are synced, not unmounted)")
    how.add_argument("--rehearse", action="store_true",
                     help="quiesce the live system, check, roll back; no relaunch")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    client = connect()
    if args.rehearse:
        return _rehearse(client, args)
    if not args.wait:
        ident = client.call("Relaunch", options=_options(args), interactive=interactive())
        # Guarded like every read after the call: the hand-off may already be stopping it.
        props = read_properties(client)
        result = {"id": ident, "state": props.get("State") if props else "gone"}
    else:
        termination = Termination()
        watch = client.watch()   # subscribe before the call
        try:
            # From here a stop signal is recorded, not obeyed: once the call is accepted,
            # a SIGTERM is most likely the shutdown we asked for.
            with termination.installed(signal.SIGTERM, signal.SIGHUP):
                ident = client.call("Relaunch", options=_options(args),
                                    interactive=interactive())
                result = wait_relaunch(client, watch, ident, terminated=termination.first)
        finally:
            watch.close()
    if args.json:
        print_json(result)
    elif args.wait:
        print(f"relaunch {ident}: the system is going down", flush=True)
    else:
        print(f"relaunch {ident} started ({result['state']})")
    return EXIT_OK


def _options(args: argparse.Namespace) -> dict:
    options: dict = {"force": True} if args.force else {}
    if args.immediate:
        options["immediate"] = True
    if args.fallback:
        options["fallback"] = args.fallback
    return options


def _rehearse(client, args: argparse.Namespace) -> int:
    report = client.call("Rehearse", options={}, interactive=interactive())
    if args.json:
        print_json(report)
    else:
        done = report.get("executed", [])
        print(f"rehearsal: {'OK' if report.get('ok') else 'FAILED'}")
        for entry in done:
            print(f"  did:      {entry.get('action')} {entry.get('target')}")
        rollback = report.get("rollback", {})
        for line in rollback.get("restored", []):
            print(f"  restored: {line}")
        for line in rollback.get("failed", []):
            print(f"  NOT RESTORED: {line}")
        for line in report.get("mismatches", []):
            print(f"  mismatch: {line}")
        if not done:
            print("  (the plan has nothing to do: no CPUs to offline, no devices to unbind)")
    return EXIT_OK if report.get("ok") else EXIT_FAILED
