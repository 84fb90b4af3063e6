"""What a stage request means (engine layer): the one way to turn a request and the
configuration into staging options.

The engine's `Stage` and `relaunchctl stage --local/--dry-run` both call `stage_options`, so
a stage in the CLI process means exactly what the daemon's would: the same method choice,
loader, command-line additions, image policy, and the same probe configuration (ACM
directories, DL handler) as `Capabilities`. Light on imports: the CLI pays for what it uses.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from relaunchd.engine.config import Config
from relaunchd.errors import InvalidArgument, NotReady
from relaunchd.launch import entry_staging, staging
from relaunchd.launch import names as launch_names
from relaunchd.platform import boot_entries, image_files
from relaunchd.platform.boot_entries import ListedEntry, Listing
from relaunchd.platform.sysroot import SysRoot

LOADERS = (None, "file", "segments")
NEXT_BOOT = "next-boot"        # the `entry` that means: what the boot loader would boot next


@dataclass(frozen=True)
class StageRequest:
    """What a caller asks to stage. The last four are only offered by the CLI's local
    staging (testing, one-off use); the daemon always uses the configuration's."""

    path: str                          # "" when `entry` names what to stage
    profile: int | None = None
    method: str | None = None          # None: launch.method of the configuration
    cmdline: str | None = None         # a custom command line (systemd-stub's rules apply)
    append: tuple[str, ...] = ()
    loader: str | None = None          # None: launch.loader, else the method's default
    allow_unsigned: bool = False       # insecure: only without any configured trust
    follow_symlinks: bool = False
    addons: bool = True
    boot_partition: str | None = None
    # A boot loader entry instead of a path: NEXT_BOOT, or an entry's id or
    # kernel-install name (platform.boot_entries.find). Staged as the loader boots it:
    # no custom command line, no profile.
    entry: str | None = None


def stage_options(config: Config, request: StageRequest, *, best_method: str | None,
                  trusted: list | None = None) -> staging.StageOptions:
    """Everything that can be refused before any work: arguments, method, loader.
    `best_method`: the strongest ready method (Capabilities' `best`), for `auto`.
    `trusted`: certificates already loaded; None: staging loads `trust.certificates`
    itself, on a second thread while it copies the image."""
    path, profile, append = request.path, request.profile, request.append
    if request.entry is not None:
        _check_entry_request(request)
    elif not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgument(f"the image path must be absolute, not {path!r}")
    if profile is not None and (not isinstance(profile, int) or isinstance(profile, bool)
                                or profile < 0):
        raise InvalidArgument(f"profile must be a number ≥ 0, not {profile!r}")
    if isinstance(append, str):
        raise InvalidArgument("append is a list of kernel arguments, not a string")
    method = request.method or config.launch.method
    if method != "auto" and method not in launch_names.NAMES:
        raise InvalidArgument(f"unknown launch method {method!r} "
                              f"(one of auto, {', '.join(launch_names.NAMES)})")
    if method == "auto":
        method = _auto_method(config, best_method)
    if config.launch.require_drtm and not launch_names.is_drtm(method):
        raise NotReady(f"launch.require_drtm is set, and the {method} method has no "
                       "dynamic launch")
    loader = request.loader if request.loader is not None else config.launch.loader
    if loader not in LOADERS:
        raise InvalidArgument(f"unknown loader {loader!r} (file or segments)")
    return staging.StageOptions(
        method=method, profile=profile, custom_cmdline=request.cmdline,
        append=[*config.cmdline.append, *append],
        trusted=list(trusted or []),
        certificate_files=[] if trusted is not None else list(config.trust.certificates),
        allow_unsigned=request.allow_unsigned,
        policy=image_files.ImagePolicy(tuple(config.image_dirs), request.follow_symlinks),
        relaunch_id=str(uuid.uuid4()), add_id_argument=config.cmdline.id_argument,
        banks=tuple(config.measurement.banks), root=SysRoot(config.root), loader=loader,
        probe_config=config.probe_config(), sinit_acm=config.txt.sinit_acm,
        require_drtm=config.launch.require_drtm,
        addons=request.addons, boot_partition=request.boot_partition)


def _check_entry_request(request: StageRequest) -> None:
    entry = request.entry
    if not isinstance(entry, str) or not entry:
        raise InvalidArgument(f"entry must be {NEXT_BOOT!r} or an entry id, not {entry!r}")
    if request.path:
        raise InvalidArgument("stage either an image path or a boot entry, not both "
                              f"({request.path!r} and entry {entry!r})")
    if request.cmdline is not None or request.profile is not None:
        raise InvalidArgument("a boot entry is staged as the boot loader boots it: its "
                              "options are the command line (use append to add to them) "
                              "and a UKI's default profile is used")


def pick_entry(listing: Listing, entry: str) -> ListedEntry:
    """The entry a request names: the next boot, or the one with that id or
    kernel-install name (NoBootEntry when there is none)."""
    if entry == NEXT_BOOT:
        return boot_entries.next_boot(listing)
    return boot_entries.find(listing, entry)


def checked_entry(config: Config, listing: Listing, entry: str) -> ListedEntry:
    """The entry a request names, refused before any work when it cannot be staged: the
    loader would not show it or relaunchd cannot stage it (InvalidBootEntry), or it has
    parts no one signed that the configuration does not allow (VerificationFailed). Its
    signature is checked by staging, on the sealed copy; a Type #2 entry's UKI location
    is the caller's to check against the image policy (`entry_staging.uki_path`)."""
    listed = pick_entry(listing, entry)
    boot_entries.require_stageable(listed, require_verified=False)
    entry_staging.require_reproducible(listed)
    entry_staging.require_signed_parts(listed, config.trust.allow_unsigned_initrd)
    return listed


def _auto_method(config: Config, best: str | None) -> str:
    if best is not None:
        return best
    if config.launch.require_drtm:
        raise NotReady("launch.require_drtm is set and no dynamic launch method is ready; "
                       "see `relaunchctl check`")
    # Measured kexec needs nothing the probe can promise (a missing TPM only
    # means no measurement); the load itself is the real test.
    return "kexec"


