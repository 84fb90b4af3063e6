"""The configuration reader on hostile input (issue #14, item 6): YAML tags, values their
constructors reject, deep nesting and fuzzed text are each an `InvalidConfig` naming the
line — never a traceback — for `relaunchd --check-config` and at daemon start (exit 2)."""

from __future__ import annotations

import re
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd import daemon
from relaunchd.engine.config import Config
from relaunchd.engine.config_file import parse_config
from relaunchd.errors import ConfigError

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
