"""Configuration: every key type-checked; errors name the key path and line."""

from __future__ import annotations

import dataclasses
import re
import string
import subprocess
import textwrap
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd import daemon
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
                                          "loader": "segments", "fallback": "none",
                                          "sealed_volumes": "block"}
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


# ------------------------------------------------------------------ hostile YAML (issue 14 item 6)

VENV_BIN = Path(__file__).resolve().parents[3] / ".venv" / "bin"

# (text, the line the error must name)
HOSTILE = [
    ("state_dir: !!python/name:os.system\n", 1),
    ("launch:\n  method: !!python/object/apply:os.system [\"id\"]\n", 2),
    ("measurement:\n  pcr: !!int abc\n", 2),
    ("measurement:\n  require_tpm: !!bool maybe\n", 2),
    ("state_dir: !!timestamp 2001-99-99\n", 1),
    ("state_dir: 2001-99-99\n", 1),                      # implicitly a timestamp
    ("runtime_dir: !!binary '%%%'\n", 1),
    ("runtime_dir: !!float x\n", 1),
    ("image_dirs: !!set {/boot: null}\n", 1),
    ("trust: !!omap [certificates: []]\n", 1),
    ("trust: !!python/object:os.system {}\n", 1),
    ("state_dir: !custom /var\n", 1),
    ("measurement: !!map\n  pcr: !!null 1\n", 2),
    ("\n\nlaunch:\n  method: !<tag:example.com,2000:x> kexec\n", 4),
    ("image_dirs: [!!python/name:os.system ]\n", 1),
    ("image_dirs: " + "[" * 20000 + "]" * 20000 + "\n", 1),
    ("cmdline:\n  append:\n" + "    - " * 1 + "[" * 20000 + "\n", 3),
    ("quiesce:\n  offline_cpus: [1, !!int 0x, 3]\n", 2),
]


def _id(text: str) -> str:
    return text[:32].replace("\n", "|")


@pytest.mark.parametrize(("text", "line"), HOSTILE, ids=[_id(h[0]) for h in HOSTILE])
def test_hostile_yaml_is_invalid_config_with_its_line(text, line):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "relaunchd.yaml")
    assert info.value.name == "InvalidConfig"
    assert info.value.line == line, str(info.value)
    assert f"line {line}" in str(info.value)


def test_core_tags_spelled_out_are_still_accepted():
    config = parse_config("state_dir: !!str /srv/state\nmeasurement:\n  pcr: !!int 16\n"
                          "  require_tpm: !!bool true\nlaunch: !!map {method: kexec}\n"
                          "image_dirs: !!seq [/boot]\n")
    assert config.state_dir == "/srv/state" and config.measurement.pcr == 16
    assert config.measurement.require_tpm is True and config.launch.method == "kexec"
    assert config.image_dirs == ("/boot",)


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "daemon start"])
@pytest.mark.parametrize(("text", "line"), HOSTILE[:5] + HOSTILE[-3:-1],
                         ids=[_id(h[0]) for h in HOSTILE[:5] + HOSTILE[-3:-1]])
def test_relaunchd_exits_2_naming_the_line(tmp_path, capsys, check, text, line):
    path = tmp_path / "relaunchd.yaml"
    path.write_text(text)
    argv = ["--config", str(path), *(["--check-config"] if check else [])]
    # Never reaches the bus: the configuration is read first (no engine is built).
    code = daemon.main(argv, make_engine=_no_engine)
    err = capsys.readouterr().err
    assert code == daemon.EXIT_CONFIG == 2
    assert re.search(rf"InvalidConfig: .*relaunchd\.yaml, line {line}\b", err), err
    assert "Traceback" not in err


def _no_engine(config, notify):
    raise AssertionError("a bad configuration must stop relaunchd before the engine")


def test_installed_relaunchd_exits_2(tmp_path):
    path = tmp_path / "relaunchd.yaml"
    path.write_text("measurement:\n  pcr: !!int abc\n")
    r = subprocess.run([str(VENV_BIN / "relaunchd"), "--config", str(path), "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "InvalidConfig" in r.stderr and "line 2" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ fuzzing

KEYS = ["root", "state_dir", "image_dirs", "trust", "certificates", "launch", "method",
        "measurement", "pcr", "banks", "quiesce", "offline_cpus", "unbind_devices",
        "metrics", "textfile_path", "cmdline", "append", "require_tpm", "x"]
TAGS = ["", "!!str ", "!!int ", "!!bool ", "!!null ", "!!float ", "!!timestamp ",
        "!!binary ", "!!python/name:os.system ", "!!python/object/apply:os.system ",
        "!!set ", "!!omap ", "!!seq ", "!!map ", "!x ", "!<tag:a,2000:b> ", "&a ", "*a "]
SCALARS = ["kexec", "auto", "/boot", "23", "-1", "0x1f", "1:30", "yes", "maybe", "~",
           "null", "2001-99-99", "2001-12-14", "1e999", ".nan", "''", '"\\x00"', "abc",
           "[", "]", "{", "}", "[1, 2]", "{a: 1}", "- 1", "? x", "|", ">", "'", '"', "#",
           ":", ",", "%YAML 1.1", "---", "...", "<<: *a", "\t", "\x00", "\ufeff"]
YAML_CHARS = string.ascii_lowercase[:6] + string.digits[:4] + " \n\t:-[]{},!&*?|>'\"#%@`~.\\/"


@st.composite
def yamlish_documents(draw) -> str:
    """Lines built from the configuration's own keys, YAML tags and awkward scalars at
    random indentation, with random YAML punctuation mixed in."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        indent = " " * draw(st.sampled_from([0, 0, 2, 4, 1, 3]))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            line = f"{draw(st.sampled_from(KEYS))}: {draw(st.sampled_from(TAGS))}" \
                   f"{draw(st.sampled_from(SCALARS))}"
        elif kind == 1:
            line = f"- {draw(st.sampled_from(TAGS))}{draw(st.sampled_from(SCALARS))}"
        elif kind == 2:
            line = f"{draw(st.sampled_from(KEYS))}:"
        else:
            line = draw(st.text(YAML_CHARS, max_size=30))
        lines.append(indent + line)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


def _parses_or_names_the_problem(text: str) -> None:
    try:
        result = parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.name == "InvalidConfig" and str(exc)
        return
    assert isinstance(result, Config)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yamlish_documents())
def test_fuzzed_documents_never_raise_anything_else(text):
    _parses_or_names_the_problem(text)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzzed_text_never_raises_anything_else(text):
    _parses_or_names_the_problem(text)
