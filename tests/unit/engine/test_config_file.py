"""Configuration: every key type-checked; errors name the key path and line."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path

import pytest

from relaunchd.engine import config as cfg
from relaunchd.engine.config import Config
from relaunchd.engine.config_file import load_config, parse_config
from relaunchd.errors import ConfigError, RelaunchError

DEFAULTS_FILE = Path(__file__).resolve().parents[3] / "conf" / "relaunchd.yaml"


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def all_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(key path, type hint) of every key of the file."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], path + ".")
        else:
            out.append((path, hints[f.name]))
    return out


def nest(path: str, value: str) -> str:
    """YAML text setting key `path` (dotted) to the YAML fragment `value`."""
    parts = path.split(".")
    lines = [f"{'  ' * i}{p}:" for i, p in enumerate(parts[:-1])]
    lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}")
    return "\n".join(lines) + "\n"


def test_defaults_file_equals_code_defaults():
    loaded = load_config(str(DEFAULTS_FILE))
    assert loaded == Config()
    assert loaded.notes == ()
    assert loaded.source == str(DEFAULTS_FILE)


def test_defaults_file_documents_every_key():
    text = DEFAULTS_FILE.read_text()
    for path, _ in all_keys():
        leaf = path.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text, path
        # every key line is preceded by a comment line (its documentation)
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{leaf}:"))
        assert any(lines[j].strip().startswith("#") for j in range(max(0, index - 3), index)), \
            path


def test_missing_file_gives_defaults_and_says_so(tmp_path):
    loaded = load_config(str(tmp_path / "nope.yaml"))
    assert loaded == Config()
    assert loaded.source is None
    assert "does not exist" in loaded.notes[0]


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(str(path)) == Config()


def test_full_example_parses():
    loaded = parse("""\
        root: /srv/fixture
        state_dir: /tmp/state
        runtime_dir: /tmp/run
        image_dirs: [/boot/efi]
        trust:
          certificates: [/etc/relaunchd/db.pem]
          uefi_db: no
        launch: {method: txt, require_drtm: true, loader: segments}
        txt:
          sinit_acm_dirs: [/boot]
          sinit_acm: /boot/sinit.bin
          dl_handler: /usr/lib/relaunchd/dl.bin
        quiesce:
          offline_cpus: [1, 2, 3]
          unbind_devices: ["0000:03:00.0", "03:00.1", "driver:nvme", "class:0x0c03"]
          respect_inhibitors: false
        measurement: {pcr: 16, banks: [sha256, sha384], require_tpm: true}
        metrics: {textfile_path: /var/lib/prometheus/node-exporter/relaunchd.prom}
        cmdline: {append: [quiet, "console=ttyS0"], id_argument: false}
        """)
    assert loaded.root == "/srv/fixture"
    assert loaded.image_dirs == ("/boot/efi",)
    assert loaded.trust.certificates == ("/etc/relaunchd/db.pem",)
    assert loaded.launch == cfg.LaunchConfig("txt", True, "segments")
    assert loaded.quiesce.offline_cpus == (1, 2, 3)
    assert loaded.quiesce.unbind_devices[3] == "class:0x0c03"
    assert loaded.measurement.banks == ("sha256", "sha384")
    assert loaded.cmdline.append == ("quiet", "console=ttyS0")
    assert loaded.to_json()["launch"] == {"method": "txt", "require_drtm": True,
                                          "loader": "segments", "fallback": "none"}
    assert parse("quiesce: {offline_cpus: none}\n").quiesce.offline_cpus == "none"


# A value of the wrong type for every kind of key, as YAML text.
WRONG = {bool: "17", int: "'seven'", str: "[a, b]", type(None): "{}"}


def wrong_value(hint: typing.Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "{a: 1}"
    if origin is not None:     # unions: a mapping is never right
        return "{a: 1}"
    return WRONG[hint]


@pytest.mark.parametrize(("path", "hint"), all_keys(), ids=[k for k, _ in all_keys()])
def test_every_key_is_type_checked(path, hint):
    text = "# leading comment\n\n" + nest(path, wrong_value(hint))
    exc = error(text)
    line = text.count("\n")          # the key is on the last line
    assert exc.key == path
    assert exc.line == line
    assert path in str(exc) and f"line {line}" in str(exc)
    assert "expected" in str(exc)
    assert isinstance(exc, RelaunchError) and exc.name == "InvalidConfig"


def is_list(hint: typing.Any) -> bool:
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(hint))


@pytest.mark.parametrize("path", [k for k, h in all_keys() if is_list(h)])
def test_list_items_are_type_checked(path):
    exc = error(nest(path, "[{x: 1}]"))
    assert exc.key == f"{path}[0]" and exc.line == path.count(".") + 1
    assert f"{path}[0]" in str(exc)


def test_unknown_key_names_path_and_line():
    exc = error("""\
        launch:
          method: kexec
          metod: txt
        """)
    assert exc.key == "launch.metod" and exc.line == 3
    assert "launch.metod" in str(exc) and "line 3" in str(exc)
    assert "unknown key" in str(exc) and "method" in str(exc)


def test_unknown_top_level_key():
    exc = error("root: /\nimages: [/boot]\n")
    assert exc.key == "images" and exc.line == 2
    assert "unknown key" in str(exc)


def test_duplicate_key():
    exc = error("launch:\n  method: kexec\n  method: txt\n")
    assert exc.key == "launch.method" and exc.line == 3 and "twice" in str(exc)


def test_bool_is_not_an_integer_nor_a_string():
    assert error("measurement: {pcr: yes}\n").key == "measurement.pcr"
    assert error("launch: {method: true}\n").key == "launch.method"
    assert error("cmdline: {id_argument: 1}\n").key == "cmdline.id_argument"


@pytest.mark.parametrize(("text", "key", "words"), [
    ("launch: {method: tx}\n", "launch.method", "must be one of"),
    ("launch: {loader: kexec_load}\n", "launch.loader", "must be one of"),
    ("measurement: {pcr: 24}\n", "measurement.pcr", "0-23"),
    ("measurement: {banks: [sha3]}\n", "measurement.banks", "unknown bank"),
    ("measurement: {banks: []}\n", "measurement.banks", "at least one"),
    ("measurement: {banks: [sha256, sha256]}\n", "measurement.banks", "twice"),
    ("quiesce: {offline_cpus: all}\n", "quiesce.offline_cpus", "must be one of"),
    ("quiesce: {offline_cpus: [0, 1]}\n", "quiesce.offline_cpus", "boot CPU"),
    ("quiesce: {offline_cpus: [-1]}\n", "quiesce.offline_cpus", "negative"),
    ("quiesce: {unbind_devices: [eth0]}\n", "quiesce.unbind_devices", "PCI address"),
    ("quiesce: {unbind_devices: ['class:zz']}\n", "quiesce.unbind_devices", "hex"),
    ("quiesce: {unbind_devices: ['driver:']}\n", "quiesce.unbind_devices", "driver name"),
    ("state_dir: var/lib/relaunchd\n", "state_dir", "absolute"),
    ("image_dirs: [/boot, boot]\n", "image_dirs", "absolute"),
    ("trust: {certificates: [db.pem]}\n", "trust.certificates", "absolute"),
])
def test_value_checks(text, key, words):
    exc = error(text)
    assert exc.key == key and exc.line == 1
    assert words in str(exc) and key in str(exc)


def test_combinations_that_cannot_work():
    exc = error("launch:\n  method: kexec\n  require_drtm: true\n")
    assert exc.key == "launch.require_drtm" and exc.line == 3
    exc = error("launch:\n  method: txt\n  loader: file\n")
    assert exc.key == "launch.loader" and exc.line == 3 and "segment" in str(exc)
    exc = error("trust:\n  uefi_db: true\n")
    assert exc.key == "trust.uefi_db" and exc.line == 2 and "not implemented yet" in str(exc)


@pytest.mark.parametrize(("text", "line"), [
    ("launch:\n  method: [kexec\n", 3),
    ("launch:\n method: a\n  loader: b\n", 3),
    ("root: '/\n", 2),
    ("a: b\n\t- c\n", 2),
])
def test_bad_yaml_has_line_and_column(text, line):
    exc = error(text)
    assert exc.line == line and exc.column is not None
    assert "not valid YAML" in str(exc) and f"line {line}" in str(exc)


def test_top_level_must_be_a_mapping():
    exc = error("- /boot\n")
    assert exc.line == 1 and "mapping" in str(exc)
    assert error("launch: kexec\n").key == "launch"


def test_non_string_keys():
    assert "plain names" in str(error("1: a\n"))


def test_unreadable_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe root: /\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError):
        load_config(str(tmp_path))      # a directory


def test_file_name_in_messages(tmp_path):
    path = tmp_path / "relaunchd.yaml"
    path.write_text("metrics:\n  textfile: /x\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}, line 2")
    assert info.value.file == str(path)
