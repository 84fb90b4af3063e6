"""`relaunchctl status`: relaunchd's properties (State, StagedImage, LastError, …)."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled, progress_line, show_value
from relaunchd.cli.output import print_json

ORDER = ("State", "CanRelaunch", "Version", "Progress", "StagedImage", "LastRelaunch",
         "LastError", "Capabilities")


def register(subparsers) -> None:
    parser = subparsers.add_parser("status", help="show relaunchd's state (over D-Bus)",
                                   description="Read every property of "
                                               "org.relaunchd.Relaunch1.Manager.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    props = connect().properties()
    if args.json:
        print_json({name: props.get(name) for name in ORDER if name in props})
        return EXIT_OK
    print(f"State:        {props.get('State')}")
    print(f"CanRelaunch:  {props.get('CanRelaunch')}")
    print(f"Version:      {props.get('Version')}")
    line = progress_line(props.get("Progress") or {})
    if line:
        print(f"Progress:     {line}")
    for name in ("StagedImage", "LastRelaunch", "LastError", "Capabilities"):
        value = props.get(name) or {}
        print(f"{name + ':':<14}{'' if value else '-'}")
        for text in show_value(value, 2) if value else ():
            print(text)
    return EXIT_OK
