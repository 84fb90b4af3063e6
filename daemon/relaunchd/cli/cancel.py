"""`relaunchctl cancel`: stop staging, or unload the staged image."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled, interactive
from relaunchd.cli.output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("cancel", help="cancel staging / unload (over D-Bus)",
                                   description="Cancel a staging in progress (an image "
                                               "staged before it stays staged) or unload "
                                               "the staged image (relaunchd returns to "
                                               "idle).")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    client = connect()
    client.call("Cancel", interactive=interactive())
    state = client.get("State")
    if args.json:
        print_json({"cancelled": True, "state": state})
    else:
        print(f"cancelled; relaunchd is {state}")
    return EXIT_OK
