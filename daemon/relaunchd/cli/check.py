"""`relaunchctl check`: what this machine can do, and why not (docs/check.md).

Exit 0 when the chosen method (default `auto`: any) is ready, 1 when not,
2 on usage errors (argparse, or a --root that is not a directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.launch import assessment, registry
from relaunchd.platform import firmware_time, readiness
from relaunchd.platform.sysroot import SysRoot

EXIT_READY = 0
EXIT_NOT_READY = 1

# Fact groups for the human report, in display order.
GROUPS = (("CPU", ("cpu.",)), ("Intel TXT", ("txt.",)), ("Launch files", ("launch.",)),
          ("TPM", ("tpm.",)), ("IOMMU", ("iommu.",)), ("kexec", ("kexec.",)),
          ("Kernel", ("kernel.",)), ("Boot", ("boot.",)), ("CPUs", ("cpus.",)))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="report whether this machine can relaunch, and how",
        description="Probe the platform (read-only) and report, per launch method, "
                    "whether it is ready and what to change if not.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="read platform paths below DIR (a fixture tree); default /")
    p.add_argument("--method", choices=("auto", *registry.NAMES), default="auto",
                   help="the method whose readiness sets the exit code (default: any)")
    p.add_argument("--acm-dir", action="append", metavar="DIR",
                   help="directory with SINIT ACMs (repeatable; default "
                        + ", ".join(readiness.ProbeConfig.acm_dirs) + ")")
    p.add_argument("--dl-handler", metavar="PATH", default=readiness.ProbeConfig.dl_handler,
                   help="TXT DL handler file (default %(default)s)")
    p.add_argument("--skl", metavar="PATH", default=readiness.ProbeConfig.skl,
                   help="AMD Secure Kernel Loader file (default %(default)s)")
    p.add_argument("--tpm-tcti", metavar="TCTI",
                   help="ask this TPM for PCRs 17/18 and the sealed volumes' PCRs "
                        "(e.g. swtpm:host=127.0.0.1,port=2321)")
    p.add_argument("--image", metavar="UKI",
                   help="predict sealed volumes for a relaunch into this image (its "
                        "`.pcrsig` for signed PCR policies)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = readiness.ProbeConfig(
        root=args.root,
        acm_dirs=tuple(args.acm_dir) if args.acm_dir else readiness.ProbeConfig.acm_dirs,
        dl_handler=args.dl_handler, skl=args.skl, tpm_tcti=args.tpm_tcti)
    report = assessment.assess(config)
    volumes = sealed_volumes_of(args)
    saved = firmware_time.last_cold_boot(SysRoot(args.root))
    if args.json:
        json.dump({**report.to_json(), "volumes": volumes, "firmware_time": saved.to_json()},
                  sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report, args.method))
        sys.stdout.write(render_volumes(volumes))
        sys.stdout.write(render_firmware_time(saved))
    ready = report.best is not None if args.method == "auto" \
        else report.verdicts[args.method].ready
    return EXIT_READY if ready else EXIT_NOT_READY


def sealed_volumes_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sealed-volume prediction (platform.sealed_volumes) for this check."""
    from relaunchd.platform import sealed_volumes

    method = "kexec" if args.method == "auto" else args.method
    return sealed_volumes.report_or_problem(
        SysRoot(args.root), sealed_volumes.Context(tcti=args.tpm_tcti, method=method),
        image=args.image)


def render_firmware_time(saved: FirmwareTime) -> str:
    if saved.avoided_usec is None:
        return f"\nFirmware time a relaunch avoids: unknown ({saved.reason})\n"
    return (f"\nFirmware time a relaunch avoids: {saved.avoided_usec / 1e6:.3f} s "
            f"(firmware {saved.firmware_usec / 1e6:.3f} s + boot loader "
            f"{saved.loader_usec / 1e6:.3f} s on the last cold boot, from {saved.source})\n")


def render_volumes(volumes: list[dict[str, Any]]) -> str:
    if not volumes:
        return "\nSealed volumes: none in /etc/crypttab with a TPM token\n"
    lines = ["", "Sealed volumes (after a relaunch)"]
    for v in volumes:
        verdict = "unlocks" if v["unlocks_after_relaunch"] else "DOES NOT UNLOCK"
        if v["unlocks_after_relaunch"] and v["stale_pcrs"]:
            verdict = f"unlocks, on stale PCR(s) {', '.join(map(str, v['stale_pcrs']))}"
        pcrs = "+".join(map(str, v["pcrs"])) or "-"
        lines.append(f"  {v['name']} ({v['device']}, PCRs {pcrs}): {verdict}")
        lines.append(f"    {v['reason']}")
        if v.get("remedy"):
            lines.append(f"        → {v['remedy']}")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "(none)"
    return "-" if value is None else str(value)


def render(report: assessment.Report, method: str = "auto") -> str:
    lines = [f"Platform facts (root {report.root})"]
    for title, prefixes in GROUPS:
        names = [n for n in report.facts if n.startswith(prefixes)]
        if not names:
            continue
        lines.append(f"  {title}")
        for name in names:
            r = report.facts[name]
            if name == "txt.acms" and r.ok:
                for a in r.value or []:
                    state = a.get("error") or ("fits" if a.get("fits") else "does not fit")
                    lines.append(f"    {'acm':22} {a['path']}: {state}")
                continue
            shown = _fmt(r.value) if r.ok else f"unknown ({r.error}: {r.detail or ''})"
            lines.append(f"    {name:22} {shown}  [{r.path}]")
    lines.append("")
    lines.append("Launch methods")
    for m, v in report.verdicts.items():
        lines.append(f"  {m}: {'READY' if v.ready else 'not ready'}")
        for c in v.checks:
            mark = "✔" if c.ok else ("✘" if c.ok is False else "?")
            lines.append(f"    {mark} {c.message}  [{c.id}]")
            if c.ok is not True and c.remedy:
                lines.append(f"        → {c.remedy}")
    lines.append("")
    if method == "auto":
        best = report.best
        lines.append(f"Best method: {best}" if best else "No launch method is ready.")
    else:
        lines.append(f"{method}: {'ready' if report.verdicts[method].ready else 'not ready'}")
    return "\n".join(lines) + "\n"
