"""Reading `/etc/relaunchd/relaunchd.yaml` into a `Config` (engine layer).

The file is composed into YAML nodes rather than loaded into plain values so every error
can name the key path *and* the line it is on (`InvalidConfig`, see `engine.config`). Kept
apart from the values so that what only needs them (`relaunchctl stage --local`) does not
import PyYAML (~20 ms).

Hostile text is an `InvalidConfig` too, never a traceback (issue #14): nesting deeper than
`MAX_DEPTH` is refused while parsing (before PyYAML's recursive composer could overflow the
stack), only YAML's core types (mapping, sequence, string, integer, float, boolean, null —
YAML 1.1 §"Type repository") may appear, whatever tag spells them, and a value its
constructor rejects (`!!int abc`) is an error naming its line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from relaunchd.engine.config import DEFAULT_PATH, Config, ConfigError
from relaunchd.launch import names as launch_names

MAX_BYTES = 1 << 20      # the documented file is ~3 kB
MAX_DEPTH = 16           # the deepest key path is 3 levels; lists add one
YAML_TAG = "tag:yaml.org,2002:"
MAPPING_TAG, SEQUENCE_TAG = YAML_TAG + "map", YAML_TAG + "seq"
SCALAR_TAGS = frozenset(YAML_TAG + t for t in ("str", "int", "float", "bool", "null"))
# What PyYAML's scalar constructors raise for a value they cannot turn into their type.
CONSTRUCTOR_ERRORS = (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError)


def load_config(path: str = DEFAULT_PATH) -> Config:
    """Read and validate `path`; a missing file gives the defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return Config(source=None, notes=(f"{path} does not exist; using the built-in "
                                          "defaults",))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}",
                          file=path) from None
    if len(text) > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES} bytes; not a relaunchd configuration",
                          file=path)
    return parse_config(text, path)


def parse_config(text: str, source: str = "<string>") -> Config:
    _check_depth(text, source)     # also what the reader refuses (control characters)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, source, text) from None
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return Config(source=source, notes=(f"{source} is empty; using the built-in "
                                                "defaults",))
        reader = _Reader(loader, source)
        values = reader.section(node, Config, "")
        config = Config(**values, source=source, key_lines=dict(reader.lines))
        reader.cross_checks(config)
        return config
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError, source: str, text: str) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        return ConfigError(f"not valid YAML: {problem}", file=source,
                           line=mark.line + 1 if mark else None,
                           column=mark.column + 1 if mark else None)
    if isinstance(exc, yaml.reader.ReaderError):     # a character YAML does not allow
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return ConfigError(f"not valid YAML: character {shown} is not allowed",
                           file=source, line=text.count("\n", 0, exc.position) + 1)
    return ConfigError(f"not valid YAML: {exc}", file=source)


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (PyYAML's parser keeps
    its own stack; only the composer and constructors recurse), at the line it happens."""
    depth = 0
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    try:
        while True:
            event = loader.get_event()
            if event is None or isinstance(event, yaml.StreamEndEvent):
                return
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"nested more than {MAX_DEPTH} levels deep",
                                      file=source, line=event.start_mark.line + 1,
                                      column=event.start_mark.column + 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    finally:
        loader.dispose()


def tag_text(tag: str) -> str:
    """A tag as it is written in YAML: `!!timestamp`, `!local`, `!<tag:x,2000:y>`."""
    if tag.startswith(YAML_TAG):
        return "!!" + tag[len(YAML_TAG):]
    return tag if tag.startswith("!") else f"!<{tag}>"


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

    def check_tag(self, path: str, node: yaml.Node) -> None:
        """Only YAML's core types, however they are spelled: no timestamps, binaries, sets,
        Python objects or local tags — nothing here has such a value, and PyYAML's
        constructors for them are where hostile text turns into tracebacks."""
        allowed = (MAPPING_TAG if isinstance(node, yaml.MappingNode) else
                   SEQUENCE_TAG if isinstance(node, yaml.SequenceNode) else None)
        if node.tag == allowed or (allowed is None and node.tag in SCALAR_TAGS):
            return
        shown = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
        raise self.error(path, node, f"unsupported YAML type {tag_text(node.tag)}{shown} "
                                     "(only strings, numbers, booleans, null, lists and "
                                     "mappings; quote a string)")

    def section(self, node: yaml.Node, cls: type, prefix: str) -> dict[str, Any]:
        self.check_tag(prefix, node)
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
        self.check_tag(path, node)
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
            for i, n in enumerate(node.value):
                self.lines[f"{path}[{i}]"] = n.start_mark.line + 1
            return tuple(self.value(n, item, f"{path}[{i}]") for i, n in enumerate(node.value))
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                         f"{self.describe(node)}")
        try:
            value = self.loader.construct_object(node)
        except CONSTRUCTOR_ERRORS:
            raise self.error(path, node, f"not a valid {self.describe(node)}") from None
        # bool is an int in Python; YAML's `yes` must not pass as a CPU number.
        if type(value) is not hint:
            raise self.error(path, node, f"expected {self.expected(hint)}, got "
                                         f"{self.describe(node)}")
        return value

    def cross_checks(self, config: Config) -> None:
        """Combinations that cannot work, reported at the later key's line."""
        launch = config.launch
        if launch.require_drtm and launch.method != "auto" \
                and not launch_names.is_drtm(launch.method):
            self.fail("launch.require_drtm",
                      f"true, but launch.method is {launch.method}, which has no dynamic "
                      "launch")
        if launch_names.is_drtm(launch.method) and launch.loader == "file":
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

