"""Configuration: `/etc/relaunchd/relaunchd.yaml` as frozen dataclasses (engine layer).

`engine.config_file` reads the file; every error names the key path *and* the line
it is on: an unknown key, a wrong type or an out-of-range value is an `InvalidConfig`
error such as
``relaunchd.yaml, line 7: launch.method: must be one of auto, txt, skinit,
kexec, not 'tx'``. A missing file means the defaults below (and says so in
`Config.notes`); `conf/relaunchd.yaml` documents every key and repeats these
defaults exactly (a unit test holds them equal).

Paths are host paths, except under `txt:`, which are platform paths read below
`root` like everything the probe reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import ConfigError
from relaunchd.formats.pcr11 import BANKS
from relaunchd.launch import names as launch_names
from relaunchd.platform.image_files import DEFAULT_IMAGE_DIRS
from relaunchd.platform.probe_config import ProbeConfig

DEFAULT_PATH = "/etc/relaunchd/relaunchd.yaml"
LAUNCH_METHODS = ("auto", *launch_names.NAMES)
LOADERS = ("file", "segments")
FALLBACKS = ("none", "reboot")
SEALED_VOLUME_POLICIES = ("block", "report")
AUTO_STAGE = ("off", "next-boot")
PCI_ADDRESS = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PCI_CLASS = re.compile(r"^(?:0x)?(?:[0-9a-f]{2}){1,3}$")

__all__ = ["DEFAULT_PATH", "Config", "ConfigError"]

Check = Callable[[Any], str | None]   # returns a complaint, or None when the value is fine


# ------------------------------------------------------------------ value checks

def _absolute(value: Any) -> str | None:
    if value is None:
        return None
    paths = value if isinstance(value, tuple) else (value,)
    for path in paths:
        if not path.startswith("/"):
            return f"must be an absolute path, not {path!r}"
    return None


def _one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            return f"must be one of {shown}, not {value!r}"
        return None
    return check


def _pcr(value: int) -> str | None:
    return None if 0 <= value <= 23 else f"must be a PCR index 0-23, not {value}"


def _banks(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must name at least one bank"
    unknown = [b for b in value if b not in BANKS]
    if unknown:
        return f"unknown bank {unknown[0]!r} (known: {', '.join(BANKS)})"
    if len(set(value)) != len(value):
        return "lists a bank twice"
    return None


def _offline_cpus(value: str | tuple[int, ...]) -> str | None:
    if isinstance(value, str):
        return _one_of("auto", "none")(value)
    for cpu in value:
        if cpu < 0:
            return f"CPU numbers are not negative ({cpu})"
        if cpu == 0:
            # kexec shuts down on the boot CPU; it cannot be offlined.
            return "CPU 0 (the boot CPU) cannot be offlined"
    return None


def _device_selectors(value: tuple[str, ...]) -> str | None:
    for item in value:
        kind, sep, rest = item.partition(":")
        if sep and kind == "driver":
            if not DRIVER_NAME.match(rest):
                return f"{item!r}: not a driver name"
        elif sep and kind == "class":
            if not PCI_CLASS.match(rest.lower()):
                return f"{item!r}: a PCI class is 2, 4 or 6 hex digits (class:0x0c03)"
        elif not PCI_ADDRESS.match(item.lower()):
            return (f"{item!r}: expected a PCI address (0000:03:00.0), driver:NAME or "
                    "class:HEX")
    return None


def _auto_stage(value: str | bool) -> str | None:
    # YAML 1.1 reads a bare `off` as false: that is the documented value, not a mistake.
    if value is False or value in AUTO_STAGE:
        return None
    return f"must be one of {', '.join(AUTO_STAGE)}, not {value!r}"


def _check(fn: Check) -> dict[str, Check]:
    return {"check": fn}


# ------------------------------------------------------------------ the configuration

@dataclass(frozen=True)
class TrustConfig:
    certificates: tuple[str, ...] = field(default=(), metadata=_check(_absolute))
    uefi_db: bool = False
    # A Type #1 boot entry's initrd and options are signed by no one (only its kernel
    # is): staging one needs this, and the refusal names it.
    allow_unsigned_initrd: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    method: str = field(default="auto", metadata=_check(_one_of(*LAUNCH_METHODS)))
    require_drtm: bool = False
    loader: str | None = field(default=None, metadata=_check(_one_of(None, *LOADERS)))
    # What Relaunch does when the relaunch cannot happen: "none" (fail, as before) or
    # "reboot" (say why, record it, and do an ordinary firmware reboot).
    fallback: str = field(default="none", metadata=_check(_one_of(*FALLBACKS)))
    # A TPM-sealed volume in /etc/crypttab that would not unlock after the relaunch:
    # "block" refuses Relaunch (force overrides; with fallback: reboot the machine reboots
    # through firmware instead, which resets the PCRs), "report" only reports it.
    sealed_volumes: str = field(default="block",
                                metadata=_check(_one_of(*SEALED_VOLUME_POLICIES)))


@dataclass(frozen=True)
class TxtConfig:
    sinit_acm_dirs: tuple[str, ...] = field(default=ProbeConfig.acm_dirs,
                                            metadata=_check(_absolute))
    sinit_acm: str | None = field(default=None, metadata=_check(_absolute))
    dl_handler: str = field(default=ProbeConfig.dl_handler, metadata=_check(_absolute))


@dataclass(frozen=True)
class QuiesceConfig:
    """The quiesce plan; stored and validated here, executed by the shutdown hook."""

    offline_cpus: str | tuple[int, ...] = field(default="auto",
                                                metadata=_check(_offline_cpus))
    unbind_devices: tuple[str, ...] = field(default=(), metadata=_check(_device_selectors))
    respect_inhibitors: bool = True


@dataclass(frozen=True)
class MeasurementConfig:
    pcr: int = field(default=23, metadata=_check(_pcr))
    banks: tuple[str, ...] = field(default=("sha256",), metadata=_check(_banks))
    require_tpm: bool = False
    tcti: str = "device:/dev/tpmrm0"


@dataclass(frozen=True)
class MetricsConfig:
    textfile_path: str | None = field(default=None, metadata=_check(_absolute))


@dataclass(frozen=True)
class BootEntriesConfig:
    """Where the boot loader entries are (platform paths, read below `root`); null: found
    as bootctl finds them (platform.boot_partition)."""

    esp: str | None = field(default=None, metadata=_check(_absolute))
    xbootldr: str | None = field(default=None, metadata=_check(_absolute))


@dataclass(frozen=True)
class CmdlineConfig:
    append: tuple[str, ...] = ()
    id_argument: bool = True


@dataclass(frozen=True)
class Config:
    root: str = field(default="/", metadata=_check(_absolute))
    state_dir: str = field(default="/var/lib/relaunchd", metadata=_check(_absolute))
    runtime_dir: str = field(default="/run/relaunchd", metadata=_check(_absolute))
    image_dirs: tuple[str, ...] = field(default=DEFAULT_IMAGE_DIRS,
                                        metadata=_check(_absolute))
    # "next-boot": `Stage` with `if_auto_stage` (the kernel-install plugin) stages the
    # entry the boot loader would boot next; "off": it stages nothing.
    auto_stage: str | bool = field(default="off", metadata=_check(_auto_stage))
    boot_entries: BootEntriesConfig = field(default_factory=BootEntriesConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    txt: TxtConfig = field(default_factory=TxtConfig)
    quiesce: QuiesceConfig = field(default_factory=QuiesceConfig)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cmdline: CmdlineConfig = field(default_factory=CmdlineConfig)
    # Not keys of the file: where the values came from, and what the reader noticed.
    source: str | None = field(default=None, compare=False, metadata={"internal": True})
    notes: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})
    # key path ("trust.certificates[1]") → line in the file, for errors found after reading
    key_lines: dict[str, int] = field(default_factory=dict, compare=False,
                                      metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.auto_stage is False:          # `auto_stage: off` unquoted, as YAML reads it
            object.__setattr__(self, "auto_stage", "off")

    def to_json(self) -> dict[str, Any]:
        """The file's keys and values (tuples as lists), for `--check-config`."""
        return _plain(self)

    def probe_config(self) -> ProbeConfig:
        """Where the readiness probe and the launch methods look: this root, the
        configured ACM directories and DL handler."""
        return ProbeConfig(root=self.root, acm_dirs=self.txt.sinit_acm_dirs,
                           dl_handler=self.txt.dl_handler)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj
