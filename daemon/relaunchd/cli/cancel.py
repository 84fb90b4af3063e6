"""`relaunchctl cancel`: stop staging, or unload the staged image."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled, interactive
from relaunchd.cli.output import print_json
from relaunchd.errors import NotStaged


def register(subparsers) -> None:
    parser = subparsers.add_parser("cancel", help="cancel staging / unload (over D-Bus)",
                                   description="Cancel a staging in progress (an image "
                                               "staged before it stays staged) or unload "
                                               "the staged image (relaunchd returns to "
                                               "idle). With --if-entry/--if-kernel, only "
                                               "if it came from that boot entry or runs "
                                               "that kernel (anything else staged is left "
                                               "alone, and that is not an error).")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--if-entry", metavar="ID",
                        help="only if staged from this boot loader entry (its id or "
                             "kernel-install name TOKEN-KVER, any case)")
    parser.add_argument("--if-kernel", metavar="KVER",
                        help="only if the staged boot entry runs this kernel release")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    client = connect()
    options = {key: value for key, value in (("if_entry", args.if_entry),
                                             ("if_kernel", args.if_kernel)) if value}
    try:
        client.call("Cancel", options=options, interactive=interactive())
    except NotStaged as exc:
        if not options:
            raise
        # Filtered: nothing staged from that entry is the answer, not a failure.
        state = client.get("State")
        if args.json:
            print_json({"cancelled": False, "state": state, "reason": str(exc)})
        else:
            print(f"not cancelled: {exc}; relaunchd is {state}")
        return EXIT_OK
    state = client.get("State")
    if args.json:
        print_json({"cancelled": True, "state": state})
    else:
        print(f"cancelled; relaunchd is {state}")
    return EXIT_OK
