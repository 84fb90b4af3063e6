"""`relaunchctl status`: relaunchd's properties (State, StagedImage, LastError, …)."""

from __future__ import annotations

import argparse
from typing import Any

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
        if name == "LastRelaunch" and value:
            print(f"  firmware time avoided: {firmware_avoided(value)}")
        for text in show_value(value, 2) if value else ():
            print(text)
    return EXIT_OK


def firmware_avoided(last: dict[str, Any]) -> str:
    """What the last relaunch avoided of firmware and boot loader (LastRelaunch's
    `firmware_time`, engine.proof): seconds and where the figure comes from, 0 and why
    (it went through firmware), or unknown and why. Over D-Bus a null is left out of the
    a{sv}, so a missing `avoided_usec` is unknown."""
    firmware = last.get("firmware_time")
    if not isinstance(firmware, dict):
        return "unknown (not recorded: concluded by an older relaunchd)"
    avoided = firmware.get("avoided_usec")
    reason = firmware.get("reason")
    if isinstance(avoided, int) and not isinstance(avoided, bool) and avoided >= 0:
        if avoided == 0:
            return f"0 s ({reason or 'went through firmware'})"
        return f"{avoided / 1e6:.3f} s ({firmware.get('source') or 'source not recorded'})"
    return f"unknown ({reason or 'no reason recorded'})"
