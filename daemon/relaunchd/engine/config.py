"""Configuration: `/etc/relaunchd/relaunchd.yaml` as frozen dataclasses (engine layer).

The file is composed into YAML nodes rather than loaded into plain values so
every error can name the key path *and* the line it is on: an unknown key, a
wrong type or an out-of-range value is an `InvalidConfig` error such as
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
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from relaunchd.errors import ConfigError
from relaunchd.formats.pcr11 import BANKS
from relaunchd.launch import registry
from relaunchd.platform.image_files import DEFAULT_IMAGE_DIRS
from relaunchd.platform.readiness import ProbeConfig

DEFAULT_PATH = "/etc/relaunchd/relaunchd.yaml"
LAUNCH_METHODS = ("auto", *registry.NAMES)
LOADERS = ("file", "segments")
PCI_ADDRESS = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PCI_CLASS = re.compile(r"^(?:0x)?(?:[0-9a-f]{2}){1,3}$")

__all__ = ["DEFAULT_PATH", "Config", "ConfigError", "load_config", "parse_config"]

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


def _check(fn: Check) -> dict[str, Check]:
    return {"check": fn}


# ------------------------------------------------------------------ the configuration

@dataclass(frozen=True)
class TrustConfig:
    certificates: tuple[str, ...] = field(default=(), metadata=_check(_absolute))
    uefi_db: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    method: str = field(default="auto", metadata=_check(_one_of(*LAUNCH_METHODS)))
    require_drtm: bool = False
    loader: str | None = field(default=None, metadata=_check(_one_of(None, *LOADERS)))


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

    def to_json(self) -> dict[str, Any]:
        """The file's keys and values (tuples as lists), for `--check-config`."""
        return _plain(self)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ loading

def load_config(path: str = DEFAULT_PATH) -> Config:
    """Read and validate `path`; a missing file gives the defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Config(source=None, notes=(f"{path} does not exist; using the built-in "
                                          "defaults",))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}",
                          file=path) from None
    return parse_config(text, path)


def parse_config(text: str, source: str = "<string>") -> Config:
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(p for p in (exc.context, exc.problem) if p)
            raise ConfigError(f"not valid YAML: {problem}", file=source,
                              line=mark.line + 1 if mark else None,
                              column=mark.column + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=source) from None
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return Config(source=source, notes=(f"{source} is empty; using the built-in "
                                                "defaults",))
        reader = _Reader(loader, source)
        values = reader.section(node, Config, "")
        config = Config(**values, source=source)
        reader.cross_checks(config)
        return config
    finally:
        loader.dispose()


class _Reader:
    """Turns YAML nodes into dataclass values, remembering each key's line."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: dict[str, int] = {}

    def error(self, key: str, node: yaml.Node, message: str) -> ConfigError:
        line = node.start_mark.line + 1
        return ConfigError(f"{key}: {message}" if key else message, file=self.source,
                           key=key or None, line=line, column=node.start_mark.column + 1)

    def section(self, node: yaml.Node, cls: type, prefix: str) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(prefix, node, f"expected a mapping of keys, got "
                                           f"{self.describe(node)}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(name, str) or key_node.tag != "tag:yaml.org,2002:str":
                raise self.error(prefix, key_node, f"keys are plain names, got "
                                                   f"{self.describe(key_node)}")
            path = f"{prefix}.{name}" if prefix else name
            if name not in known:
                raise self.error(path, key_node, "unknown key (known: "
                                 + ", ".join(known) + ")")
            if name in values:
                raise self.error(path, key_node, "given twice")
            self.lines[path] = key_node.start_mark.line + 1
            value = self.value(value_node, hints[name], path)
            check = known[name].metadata.get("check")
            complaint = check(value) if check else None
            if complaint:
                raise self.error(path, value_node, complaint)
            values[name] = value
        return values

    def value(self, node: yaml.Node, hint: Any, path: str) -> Any:
        if dataclasses.is_dataclass(hint):
            return hint(**self.section(node, hint, path))
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            options = typing.get_args(hint)
            if type(None) in options and self.is_null(node):
                return None
            if isinstance(node, yaml.SequenceNode):
                listed = [o for o in options if typing.get_origin(o) is tuple]
                if listed:   # a list: its own errors are the precise ones
                    return self.value(node, listed[0], path)
            for option in options:
                if option is type(None):
                    continue
                try:
                    return self.value(node, option, path)
                except ConfigError:
                    continue
            raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                         f"{self.describe(node)}")
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                             f"{self.describe(node)}")
            item = typing.get_args(hint)[0]
            return tuple(self.value(n, item, f"{path}[{i}]") for i, n in enumerate(node.value))
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                         f"{self.describe(node)}")
        value = self.loader.construct_object(node)
        # bool is an int in Python; YAML's `yes` must not pass as a CPU number.
        if type(value) is not hint:
            raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                         f"{self.describe(node)}")
        return value

    def cross_checks(self, config: Config) -> None:
        """Combinations that cannot work, reported at the later key's line."""
        launch = config.launch
        if launch.require_drtm and launch.method != "auto" \
                and not registry.is_drtm(launch.method):
            self.fail("launch.require_drtm",
                      f"true, but launch.method is {launch.method}, which has no dynamic "
                      "launch")
        if registry.is_drtm(launch.method) and launch.loader == "file":
            self.fail("launch.loader", f"the {launch.method} method needs the segment loader, "
                                       "not file")
        if config.trust.uefi_db:
            self.fail("trust.uefi_db", "reading the UEFI db from efivarfs is not implemented "
                                       "yet; set it to false and list the db certificates "
                                       "under trust.certificates")

    def fail(self, path: str, message: str) -> None:
        raise ConfigError(f"{path}: {message}", file=self.source, key=path,
                          line=self.lines.get(path))

    @staticmethod
    def is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    @staticmethod
    def describe(node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        kind = node.tag.rsplit(":", 1)[-1]
        names = {"str": "string", "int": "integer", "bool": "boolean", "null": "null",
                 "float": "number"}
        return f"{names.get(kind, kind)} {node.value!r}" if kind != "null" else "null"

    @classmethod
    def expected(cls, hint: Any) -> str:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return " or ".join(cls.expected(a) for a in typing.get_args(hint))
        if origin is tuple:
            item = typing.get_args(hint)[0]
            return "a list of " + {bool: "booleans", int: "integers", str: "strings"}.get(
                item, str(item))
        return {bool: "a boolean", int: "an integer", str: "a string",
                type(None): "null"}.get(hint, str(hint))

