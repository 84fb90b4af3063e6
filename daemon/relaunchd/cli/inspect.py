"""`relaunchctl inspect`: sections, os-release, cmdline, signatures, PCR 11."""

from __future__ import annotations

import argparse
import sys

from relaunchd.cli import EXIT_INVALID, EXIT_OK
from relaunchd.cli.output import human_size, print_json, progress_printer
from relaunchd.errors import RelaunchError
from relaunchd.formats import pcr11


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show what a UKI contains and the PCR 11 values it produces",
        description="Parse Unified Kernel Images and predict PCR 11 as systemd-stub "
                    "measures them. Exit 0 if every image parsed, 2 if any was rejected.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="resolve profile N of a multi-profile UKI (default 0)")
    parser.add_argument("--bank", action="append", choices=pcr11.BANKS, dest="banks",
                        help="PCR bank to predict (repeatable; default: all four)")
    parser.add_argument("--cert", action="append", default=[], metavar="FILE",
                        help="also check the signature against this certificate (PEM/DER)")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="accept an IMAGE that is itself a symbolic link (links are "
                             "only followed when root or you own them, in a directory "
                             "nobody else may write)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from relaunchd.formats.image_report import inspect_image
    from relaunchd.platform.image_files import open_image

    banks = tuple(b for b in pcr11.BANKS if b in (args.banks or pcr11.BANKS))
    trusted = []
    if args.cert:
        # Only then: trust_store brings cryptography (~70 ms), which an unsigned image
        # never needs (formats.image_report imports it only for a signature).
        from relaunchd.platform import trust_store

        trusted = trust_store.load_certificates(args.cert)
    results: list[dict] = []
    status = EXIT_OK
    for path in args.images:
        try:
            # confirm=False: inspect_image runs pefile's cross-check while it hashes.
            with open_image(path, follow_symlinks=args.follow_symlinks,
                            confirm=False) as image:
                report = inspect_image(image, profile=args.profile, banks=banks,
                                       trusted=trusted,
                                       progress=progress_printer(f"hashing {path}"))
            results.append(report.to_json())
        except RelaunchError as exc:
            status = EXIT_INVALID
            results.append({"path": path, "error": f"{exc.name}: {exc}"})
            if not args.json:
                print(f"relaunchctl: {exc.name}: {exc}", file=sys.stderr)
    if args.json:
        print_json(results[0] if len(results) == 1 else results)
    else:
        for i, result in enumerate(r for r in results if "error" not in r):
            if i:
                print()
            print_report(result)
    return status


def print_report(r: dict) -> None:
    osr = r["os_release"]
    title = osr.get("PRETTY_NAME") or osr.get("NAME") or osr.get("ID") or "-"
    stub = r["stub_version"] or "unknown"
    print(f"{r['path']}  ({human_size(r['size'])}, {r['machine']}, systemd-stub {stub})")
    rows = [
        ("OS", title),
        ("uname", r["uname"] or "-"),
        ("cmdline", r["cmdline"] if r["cmdline"] is not None else "-"),
    ]
    if r["profiles"]:
        names = ", ".join(f"@{p['number']} {p.get('ID', '')}".rstrip() for p in r["profiles"])
        rows.append(("profiles", f"{names} (showing @{r['profile']})"))
    sig = r["signature"]
    if not sig["signed"]:
        rows.append(("signature", "unsigned"))
    else:
        rows.append(("signature", "; ".join(sig["signers"]) or "signed"))
        if sig.get("verified_by"):
            rows.append(("trusted", f"yes, by {sig['verified_by']}"))
        for reason in sig.get("reasons", []):
            rows.append(("", reason))
    for key, value in rows:
        print(f"  {key:<10} {value}")
    print("  sections")
    print(f"    {'NAME':<9} {'SIZE':>10}  {'SHA256':<64}  USED")
    for s in r["sections"]:
        print(f"    {s['name']:<9} {s['size']:>10}  {s['sha256']}  {'*' if s['used'] else ''}")
    print(f"  PCR 11 after {', '.join(r['measured_sections'])}")
    for bank, value in r["pcr11"].items():
        print(f"    {bank:<7} {value}")
    for item in r["not_measured"]:
        print(f"    (not measured: {item['section']}: {item['why']})")
    for phase, values in r["pcr11_phases"].items():
        print(f"  PCR 11 after phase {phase}")
        for bank, value in values.items():
            print(f"    {bank:<7} {value}")
    if r["pcrsig"] is not None:
        print("  .pcrsig")
        for bank, phases in r["pcrsig"].items():
            for phase, check in phases.items():
                verdict = "matches" if check["matches"] else "no signed policy"
                if check["signature_valid"] is not None:
                    verdict += ", signature " + ("valid" if check["signature_valid"]
                                                 else "INVALID")
                print(f"    {bank:<7} {phase:<42} {verdict}")
    for warning in r["warnings"]:
        print(f"  warning: {warning}")
