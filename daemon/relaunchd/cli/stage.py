"""`relaunchctl stage` and `relaunchctl unload`.

`stage` goes through relaunchd (D-Bus, `busclient.stage`) when it is reachable and no
local-only option is given; `--local` (or relaunchd being absent) stages in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from relaunchd.cli import EXIT_OK
from relaunchd.cli.output import human_size, print_json, progress_printer
from relaunchd.engine.config import BootEntriesConfig, Config, TrustConfig, TxtConfig
from relaunchd.errors import InvalidArgument
from relaunchd.platform.image_files import DEFAULT_IMAGE_DIRS

if TYPE_CHECKING:
    from relaunchd.platform.boot_entries import ListedEntry


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stage", help="verify a UKI or boot entry and load it for the next relaunch",
        description="Copy IMAGE into sealed memory, verify its signature, build the kernel, "
                    "initrd and command line as systemd-stub would, and load them with "
                    "kexec_file_load (or write them out with --dry-run). With --next-boot "
                    "or --entry, stage a boot loader entry as the boot loader would boot "
                    "it instead.")
    parser.add_argument("image", metavar="IMAGE", nargs="?")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--next-boot", action="store_true",
                       help="stage the boot loader entry the boot loader would boot next "
                            "(one-shot, default, loader.conf, first entry)")
    which.add_argument("--entry", metavar="ID",
                       help="stage this boot loader entry (its id or kernel-install "
                            "name, any case; see `relaunchctl images`)")
    parser.add_argument("--if-auto-stage", action="store_true",
                        help="with --next-boot, through relaunchd: stage only if its "
                             "configuration says auto_stage: next-boot, else stage nothing "
                             "(the kernel-install plugin)")
    parser.add_argument("--allow-unsigned-initrd", action="store_true",
                        help="local: stage a Type #1 entry although its initrd and options "
                             "are signed by no one (trust.allow_unsigned_initrd)")
    parser.add_argument("--esp", metavar="DIR",
                        help="local: the ESP's mount point (default: found as bootctl "
                             "finds it)")
    parser.add_argument("--xbootldr", metavar="DIR",
                        help="local: the XBOOTLDR partition's mount point")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--dry-run", action="store_true",
                        help="build and verify everything but load nothing")
    parser.add_argument("--output", metavar="DIR",
                        help="with --dry-run: write kernel, initrd, cmdline, plan.json into "
                             "DIR, a new directory (made with mode 0700) or one you own "
                             "that nobody else may write; existing files are never "
                             "overwritten")
    parser.add_argument("--local", action="store_true",
                        help="stage in this process, without relaunchd (the daemon is used "
                             "when reachable and no local-only option is given)")
    parser.add_argument("--no-wait", action="store_true",
                        help="through relaunchd: return once staging has started")
    parser.add_argument("--method", choices=("kexec", "txt", "skinit"),
                        help="kexec: measured kexec (default); txt/skinit: DRTM via the "
                             "segment loader")
    parser.add_argument("--loader", choices=("file", "segments"),
                        help="file: kexec_file_load (default for kexec); segments: "
                             "kexec_load with relaunchd's zero page, SLRT and purgatory "
                             "(with --method kexec: a hand-off rehearsal without DRTM)")
    parser.add_argument("--sinit-acm", metavar="FILE", help="SINIT ACM for --method txt")
    parser.add_argument("--dl-handler", metavar="FILE", help="DL handler for --method txt")
    parser.add_argument("--profile", type=int, metavar="N")
    parser.add_argument("--cert", action="append", default=[], metavar="FILE",
                        help="trusted certificate (PEM/DER, repeatable); the image must "
                             "verify against one")
    parser.add_argument("--insecure-allow-unsigned", action="store_true",
                        help="stage without signature verification (testing only)")
    parser.add_argument("--cmdline", metavar="TEXT",
                        help="custom command line (ignored under Secure Boot when the UKI "
                             "has .cmdline, as systemd-stub does)")
    parser.add_argument("--append", action="append", default=[], metavar="ARG",
                        help="extra kernel argument (repeatable)")
    parser.add_argument("--image-dir", action="append", default=[], metavar="DIR",
                        help="allowed image directory (repeatable; default: /boot, /efi, "
                             "/boot/efi, /usr/lib/kernel, /var/lib/relaunchd/images)")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="follow symbolic links below the allowed directory, but only "
                             "links root owns in directories only root can write, leading "
                             "beneath an allowed directory (refused otherwise)")
    parser.add_argument("--no-addons", action="store_true",
                        help="ignore add-ons (*.addon.efi in loader/addons/ and "
                             "IMAGE.extra.d/), which are otherwise applied as systemd-stub "
                             "applies them")
    parser.add_argument("--boot-partition", metavar="DIR",
                        help="root of the partition IMAGE boots from, whose loader/addons/ "
                             "holds the global add-ons (default: the mount point holding "
                             "IMAGE)")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="platform root prefix (tests)")
    parser.set_defaults(func=run_stage)

    unload = subparsers.add_parser("unload", help="unload a staged kexec image",
                                   description="Unload the kexec image loaded for the next "
                                               "relaunch (KEXEC_FILE_UNLOAD).")
    unload.add_argument("--json", action="store_true")
    unload.add_argument("--root", default="/", metavar="DIR")
    unload.set_defaults(func=run_unload)


LOCAL_ONLY = ("dry_run", "output", "sinit_acm", "dl_handler", "cert", "insecure_allow_unsigned",
              "image_dir", "follow_symlinks", "no_addons", "boot_partition",
              "allow_unsigned_initrd", "esp", "xbootldr")


def entry_of(args: argparse.Namespace) -> str | None:
    """The boot entry asked for (engine.stage_request.NEXT_BOOT or an id), checking that
    exactly one of IMAGE, --next-boot, --entry is given."""
    entry = "next-boot" if args.next_boot else args.entry
    if (entry is None) == (args.image is None):
        raise InvalidArgument("name what to stage: IMAGE, --next-boot or --entry ID "
                              "(exactly one)")
    if args.if_auto_stage and not args.next_boot:
        raise InvalidArgument("--if-auto-stage goes with --next-boot")
    return entry


def run_stage(args: argparse.Namespace) -> int:
    entry = entry_of(args)
    local = args.local or args.root != "/" or any(getattr(args, o) for o in LOCAL_ONLY)
    if args.if_auto_stage and local:
        raise InvalidArgument("--if-auto-stage asks relaunchd's configuration (auto_stage); "
                              "it cannot be combined with local staging options")
    if not local:
        from relaunchd.cli import busclient

        if busclient.daemon_available():
            return busclient.stage(args)
        if args.if_auto_stage:
            from relaunchd.errors import NoDaemon

            raise NoDaemon("relaunchd is not reachable; --if-auto-stage asks its "
                           "configuration")
    if args.output and not args.dry_run:
        raise InvalidArgument("--output needs --dry-run")
    from relaunchd.engine.stage_request import StageRequest, stage_options
    from relaunchd.launch import staging

    # The same options the daemon's Stage builds (engine.stage_request), from a
    # configuration made of these flags. The certificates load (and cryptography
    # imports) on a second thread while the image is copied (staging._Preload).
    request = StageRequest(
        path=os.path.abspath(args.image) if args.image is not None else "",
        profile=args.profile,
        method=args.method or "kexec", cmdline=args.cmdline, append=tuple(args.append),
        loader=args.loader, allow_unsigned=args.insecure_allow_unsigned,
        follow_symlinks=args.follow_symlinks, addons=not args.no_addons,
        boot_partition=args.boot_partition, entry=entry)
    config = local_config(args)
    options = stage_options(config, request, best_method=None, trusted=None)
    listed = local_entry(config, entry) if entry is not None else None
    what = args.image if listed is None else f"boot entry {listed.id}"
    show = progress_printer(f"staging {what}")
    progress = (lambda _step, d, t: show(d, t)) if show else None
    if listed is None:
        staged = staging.prepare(request.path, options, progress=progress)
    else:
        from relaunchd.launch import entry_staging

        staged = entry_staging.prepare(listed, options, progress=progress,
                                       allow_unsigned_parts=config.trust.allow_unsigned_initrd)
    try:
        written: list[str] = []
        if args.dry_run:
            if args.output:
                written = staging.write_artifacts(staged, args.output)
        else:
            staging.load(staged, options.root)
        plan = staged.plan()
        plan["loaded"] = not args.dry_run
        plan["written"] = written
        if listed is not None:
            plan["entry"] = listed.staged_record()
        if args.json:
            print_json(plan)
        else:
            verb = "verified (dry run, nothing loaded)" if args.dry_run else "staged"
            print(f"{what}: {verb}, id {staged.id}")
            if listed is not None:
                record = plan["entry"]
                print(f"  entry    {record['path']} ({record['type']}; signed: "
                      f"{', '.join(record['signed'])}; signed by no one: "
                      f"{', '.join(record['unsigned']) or 'nothing'})")
            print(f"  kernel   {human_size(staged.kernel.size)}  sha256 {staged.kernel.sha256}")
            if staged.initrd:
                print(f"  initrd   {human_size(staged.initrd.size)}  sha256 "
                      f"{staged.initrd.sha256}  ({', '.join(staged.initrd_parts)})")
            else:
                print("  initrd   none")
            print(f"  cmdline  {staged.cmdline.text}")
            for addon in staged.addons:
                trust = (f"verified by {addon['verified_by']}" if addon["verified_by"]
                         else "not verified")
                print(f"  add-on   {addon['path']}  ({', '.join(addon['sections'])}; {trust})")
            if staged.segment_plan is not None:
                seg = staged.segment_plan
                print(f"  loader   segments, entry 0x{seg.entry:x}, slr_table_addr "
                      f"0x{seg.slrt_address or 0:x}")
                for item in seg.segments:
                    print(f"    {item.name:<11} 0x{item.address:010x}  {human_size(item.memsz)}")
            for note in plan["notes"]:
                print(f"  note: {note}", file=sys.stderr)
            for path in written:
                print(f"  wrote {path}")
        return EXIT_OK
    finally:
        staged.close()


def local_config(args: argparse.Namespace) -> Config:
    """The configuration a local stage runs under: the defaults, with the flags' root,
    image directories, trust, boot partitions and TXT inputs."""
    txt = TxtConfig(sinit_acm=args.sinit_acm,
                    dl_handler=args.dl_handler or TxtConfig.dl_handler)
    return Config(root=args.root,
                  image_dirs=tuple(args.image_dir) or DEFAULT_IMAGE_DIRS,
                  trust=TrustConfig(certificates=tuple(args.cert),
                                    allow_unsigned_initrd=args.allow_unsigned_initrd),
                  boot_entries=BootEntriesConfig(esp=args.esp, xbootldr=args.xbootldr),
                  txt=txt)


def local_entry(config: Config, entry: str) -> ListedEntry:
    """The boot entry a local stage names, checked as the daemon checks it
    (engine.stage_request.checked_entry), its UKI under the image policy."""
    from relaunchd.engine.stage_request import checked_entry
    from relaunchd.formats.boot_entries import TYPE2
    from relaunchd.launch import entry_staging
    from relaunchd.platform import boot_entries, image_files
    from relaunchd.platform.sysroot import SysRoot

    root = SysRoot(config.root)
    listing = boot_entries.list_entries(root, esp=config.boot_entries.esp,
                                        xbootldr=config.boot_entries.xbootldr)
    listed = checked_entry(config, listing, entry)
    if listed.entry.type == TYPE2:
        image_files.check_location(entry_staging.uki_path(root, listed),
                                   image_files.ImagePolicy(tuple(config.image_dirs)))
    return listed


def run_unload(args: argparse.Namespace) -> int:
    from relaunchd.launch import staging
    from relaunchd.platform.sysroot import SysRoot

    root = SysRoot(args.root)
    was = staging.loaded(root)
    staging.unload(root)
    if args.json:
        print_json({"unloaded": True, "was_loaded": was})
    else:
        print("kexec image unloaded" if was else "nothing was loaded")
    return EXIT_OK
