"""`relaunchctl relaunch [--wait] [--force]`: relaunch into the staged image.

With --wait it returns only when the system is going down (relaunchd reached
`relaunching`, or left the bus) — exit 0 — or the relaunch failed — exit 1; so it
can be kured's --reboot-command or Ansible's reboot_command.
"""

from __future__ import annotations

import argparse

from . import EXIT_OK
from .busclient import connect, handled, interactive, wait_relaunch
from .output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("relaunch", help="relaunch into the staged image (D-Bus)",
                                   description="Quiesce and hand off to the staged kernel.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--wait", action="store_true",
                        help="block until the system goes down (0) or the relaunch fails (1)")
    parser.add_argument("--force", action="store_true",
                        help="relaunch even if inhibitors or readiness checks object")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    client = connect()
    watch = client.watch() if args.wait else None   # subscribe before the call
    try:
        options = {"force": True} if args.force else {}
        ident = client.call("Relaunch", options=options, interactive=interactive())
        result = {"id": ident, "state": None}
        if watch is not None:
            result = wait_relaunch(client, watch, ident)
        else:
            result["state"] = client.get("State")
    finally:
        if watch is not None:
            watch.close()
    if args.json:
        print_json(result)
    elif args.wait:
        print(f"relaunch {ident}: the system is going down")
    else:
        print(f"relaunch {ident} started ({result['state']})")
    return EXIT_OK
