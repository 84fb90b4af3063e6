"""`relaunchctl images`: the UKIs relaunchd finds in its image directories."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled
from relaunchd.cli.output import human_size, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("images", help="list stageable images (over D-Bus)",
                                   description="List the UKIs in relaunchd's configured "
                                               "image directories.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    images = connect().call("ListImages")
    if args.json:
        print_json(images)
        return EXIT_OK
    if not images:
        print("no images")
    for image in images:
        size = image.get("size")
        mark = "*" if image.get("staged") else " "
        extra = "  ".join(f"{k}={v}" for k, v in image.items()
                          if k not in ("path", "size", "staged") and not isinstance(v, dict | list))
        print(f"{mark} {image.get('path')}  {human_size(size) if isinstance(size, int) else ''}"
              f"  {extra}".rstrip())
    return EXIT_OK
