"""`relaunchctl history`: relaunchd's events (stage, relaunch, proof), newest first."""

from __future__ import annotations

import argparse
import time

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled, show_value
from relaunchd.cli.output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("history", help="show past relaunches (over D-Bus)",
                                   description="Past relaunches and their verdicts, newest "
                                               "first.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-n", "--limit", type=int, default=20, metavar="N")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    entries = connect().call("GetHistory", options={"limit": args.limit})
    if args.json:
        print_json(entries)
        return EXIT_OK
    if not entries:
        print("no relaunches yet")
    for entry in entries:
        when = entry.get("time")
        stamp = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
                 if isinstance(when, int | float) else str(when or "?"))
        print(f"{stamp}  {entry.get('event', '?')}  {entry.get('id') or '-'}")
        rest = {k: v for k, v in entry.items() if k not in ("time", "id", "event")}
        for line in show_value(rest.get("detail", rest), 4):
            print(line)
    return EXIT_OK
