"""`relaunchctl images`: the UKIs relaunchd finds in its image directories, and the boot
loader's entries (engine.catalogue: items of kind image, boot-loader, boot-entry)."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_OK
from relaunchd.cli.busclient import connect, handled
from relaunchd.cli.output import human_size, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("images", help="list stageable images and boot entries "
                                                  "(over D-Bus)",
                                   description="List the UKIs in relaunchd's configured "
                                               "image directories, and the boot loader's "
                                               "entries in its order: which one boots next, "
                                               "which is the default, whether each kernel "
                                               "verifies, what relaunchd refuses.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=handled(run))


def run(args: argparse.Namespace) -> int:
    items = connect().call("ListImages")
    if args.json:
        print_json(items)
        return EXIT_OK
    images = [i for i in items if i.get("kind", "image") == "image"]
    loader = next((i for i in items if i.get("kind") == "boot-loader"), None)
    entries = [i for i in items if i.get("kind") == "boot-entry"]
    if not images:
        print("no images")
    for image in images:
        size = image.get("size")
        mark = "*" if image.get("staged") else " "
        extra = "  ".join(f"{k}={v}" for k, v in image.items()
                          if k not in ("path", "size", "staged", "kind")
                          and not isinstance(v, dict | list))
        print(f"{mark} {image.get('path')}  {human_size(size) if isinstance(size, int) else ''}"
              f"  {extra}".rstrip())
    if loader is not None:
        print()
        for line in loader_lines(loader):
            print(line)
    for entry in entries:
        print(entry_line(entry))
    return EXIT_OK


def loader_lines(loader: dict) -> list[str]:
    if "error" in loader:
        return [f"boot entries: {loader['error']}"]
    where = ", ".join(f"{name} {loader[key]}" for name, key in (("ESP", "esp"),
                                                               ("XBOOTLDR", "xbootldr"))
                      if loader.get(key)) or "no boot partition found"
    lines = [f"boot entries ({where}; loader {loader.get('loader') or 'unknown'}):"]
    if loader.get("next_boot"):
        lines.append(f"  next boot: {loader['next_boot']} ({loader.get('next_boot_reason')})")
    lines += [f"  note: {note}" for note in loader.get("notes") or []]
    return lines


def entry_line(entry: dict) -> str:
    """`>` the next boot, `+` the default (when another boots next); then id, type,
    version, title, the verdict."""
    mark = ">" if entry.get("next_boot") else "+" if entry.get("default") else " "
    verified = {True: "verified", False: "NOT verified"}.get(entry.get("verified"), "")
    problems = ", ".join(p.get("reason", "") for p in entry.get("problems") or [])
    if not entry.get("listed", True):
        state = f"not shown by the loader: {problems}"
    elif not entry.get("stageable", True):
        state = f"not stageable: {problems}"
    else:
        state = verified
    fields = [entry.get("id", "?"), entry.get("type", ""), entry.get("version") or "-",
              repr(entry.get("title") or ""), state]
    return f"{mark} " + "  ".join(f for f in fields if f)
