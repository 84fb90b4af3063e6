"""`relaunchctl verify`: exit 0 only if a signature verifies against a given cert."""

from __future__ import annotations

import argparse

from relaunchd.cli import EXIT_FAILED, EXIT_OK
from relaunchd.cli.output import print_json
from relaunchd.platform import trust_store


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="verify a UKI's Authenticode signature against certificates",
        description="Exit 0 if a signature of IMAGE verifies against one of the "
                    "certificates, 1 if not, 2 if the image or a certificate is invalid.")
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("--cert", action="append", required=True, metavar="FILE",
                        help="trusted certificate, PEM or DER (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="accept an IMAGE that is itself a symbolic link (links are "
                             "only followed when root or you own them, in a directory "
                             "nobody else may write)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from relaunchd.formats import authenticode
    from relaunchd.platform.image_files import open_image

    trusted = trust_store.load_certificates(args.cert)
    with open_image(args.image, follow_symlinks=args.follow_symlinks) as image:
        report = authenticode.verify_file(image.fd, image.headers, trusted)
    if args.json:
        print_json({"path": args.image, **dataclasses.asdict(report)})
    elif report.verified:
        print(f"{args.image}: signature OK, signed by {report.verified_by}")
    else:
        why = "; ".join(report.reasons) or "no signature verifies"
        print(f"{args.image}: verification FAILED: {why}")
    return EXIT_OK if report.verified else EXIT_FAILED
