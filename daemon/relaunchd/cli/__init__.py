"""`relaunchctl`: the command-line adapter.

One module per command under this package; each has `register(subparsers)`
which adds its parser and sets `func(args) -> int`. This module only
dispatches, prints named errors and maps them to the documented exit codes.

Exit codes (stable, see docs/relaunchctl.md):
  0  success
  1  a clean "no": verification failed, not ready, kexec refused or unsupported
  2  invalid input or usage (bad image, bad arguments, unreadable file)
  3  internal error (a bug: please report it)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from relaunchd import __version__
from relaunchd.errors import KexecFailed, NotReady, RelaunchError, Unsupported, VerificationFailed

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERNAL = 3

# Command modules, in the order `--help` lists them.
COMMANDS = ("inspect", "verify", "check", "stage",
            "status", "images", "relaunch", "cancel", "history")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or — when the command is known from argv — one with only
    that command, so `relaunchctl inspect` does not import the probe layer."""
    parser = argparse.ArgumentParser(
        prog="relaunchctl",
        description="Inspect, verify and relaunch into Unified Kernel Images.",
    )
    parser.add_argument("--version", action="version", version=f"relaunchctl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    try:
        return args.func(args)
    except (VerificationFailed, NotReady, KexecFailed, Unsupported) as exc:
        print(f"relaunchctl: {exc.name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RelaunchError as exc:
        print(f"relaunchctl: {exc.name}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("relaunchctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
