"""The node-exporter textfile: exact exposition text, escaping, a format check that does not
share code with the renderer, and the atomic, 0644, create-nothing-else write."""

from __future__ import annotations

import os
import re
import stat

import pytest

from relaunchd.engine.core import Engine
from relaunchd.formats.firmware_time import FirmwareTime
from relaunchd.prometheus import Metrics, TextfileExporter, render, write_textfile
from support.engine_env import Env, make_env, new_boot

VERIFIED = {"id": "r-42", "method": "txt", "image": "/boot/efi/EFI/Linux/new.efi",
            "time": "2026-11-22T10:00:00+00:00", "verified": True, "measured": True,
            "downtime_ms": 1234, "drtm": True,
            "firmware_time": {"source": "systemd-boot", "firmware_usec": 9120000,
                              "loader_usec": 3225000, "avoided_usec": 12345000,
                              "reason": None}}

EXPECTED_VERIFIED = """\
# HELP relaunchd_staged 1 if an image is staged (loaded for relaunch).
# TYPE relaunchd_staged gauge
relaunchd_staged 0
# HELP relaunchd_state The relaunch engine's current state (value is 1).
# TYPE relaunchd_state gauge
relaunchd_state{state="idle"} 1
# HELP relaunchd_last_relaunch_timestamp_seconds Unix time of the last relaunch's hand-off \
to the new kernel.
# TYPE relaunchd_last_relaunch_timestamp_seconds gauge
relaunchd_last_relaunch_timestamp_seconds 1795341600
# HELP relaunchd_last_relaunch_verified 1 if the last relaunch was verified after the new boot.
# TYPE relaunchd_last_relaunch_verified gauge
relaunchd_last_relaunch_verified 1
# HELP relaunchd_last_relaunch_measured 1 if the last relaunch was measured into the TPM.
# TYPE relaunchd_last_relaunch_measured gauge
relaunchd_last_relaunch_measured 1
# HELP relaunchd_last_relaunch_drtm 1 if the last relaunch was a DRTM (dynamic launch).
# TYPE relaunchd_last_relaunch_drtm gauge
relaunchd_last_relaunch_drtm 1
# HELP relaunchd_last_relaunch_downtime_seconds Downtime of the last relaunch, from hand-off \
to the new system up.
# TYPE relaunchd_last_relaunch_downtime_seconds gauge
relaunchd_last_relaunch_downtime_seconds 1.234
# HELP relaunchd_last_relaunch_firmware_avoided_seconds Firmware and boot loader time the \
last relaunch avoided (0: it went through firmware).
# TYPE relaunchd_last_relaunch_firmware_avoided_seconds gauge
relaunchd_last_relaunch_firmware_avoided_seconds 12.345
# HELP relaunchd_last_relaunch_info The last relaunch's id, method and image; the value is \
always 1.
# TYPE relaunchd_last_relaunch_info gauge
relaunchd_last_relaunch_info{id="r-42",method="txt",image="/boot/efi/EFI/Linux/new.efi"} 1
# HELP relaunchd_relaunches_total Relaunches performed, by result.
# TYPE relaunchd_relaunches_total counter
relaunchd_relaunches_total{result="verified"} 3
relaunchd_relaunches_total{result="unverified"} 1
# HELP relaunchd_firmware_seconds_saved_total Firmware and boot loader time relaunches \
avoided, from the last cold boot's figures (unknown counts 0).
# TYPE relaunchd_firmware_seconds_saved_total counter
relaunchd_firmware_seconds_saved_total 37.035
"""

EXPECTED_EMPTY = """\
# HELP relaunchd_staged 1 if an image is staged (loaded for relaunch).
# TYPE relaunchd_staged gauge
relaunchd_staged 1
# HELP relaunchd_state The relaunch engine's current state (value is 1).
# TYPE relaunchd_state gauge
relaunchd_state{state="staged"} 1
# HELP relaunchd_relaunches_total Relaunches performed, by result.
# TYPE relaunchd_relaunches_total counter
relaunchd_relaunches_total{result="verified"} 0
relaunchd_relaunches_total{result="unverified"} 0
# HELP relaunchd_firmware_seconds_saved_total Firmware and boot loader time relaunches \
avoided, from the last cold boot's figures (unknown counts 0).
# TYPE relaunchd_firmware_seconds_saved_total counter
relaunchd_firmware_seconds_saved_total 0
"""


def verified() -> Metrics:
    return Metrics(staged=False, last_relaunch=dict(VERIFIED),
                   relaunches_total={"unverified": 1, "verified": 3}, state="idle",
                   firmware_saved_usec=37035000)


def empty() -> Metrics:
    return Metrics(staged=True, last_relaunch={}, relaunches_total={}, state="staged")


# --- an independent check of the text format (no code shared with metrics.py) ------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf"
SAMPLE = re.compile(rf"^({NAME})(\{{{LABEL}(?:,{LABEL})*\}})? ({NUMBER})$")
HELP = re.compile(rf"^# HELP ({NAME}) .*$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")


def check_exposition(text: str) -> dict[str, list[str]]:
    """Samples per family; fails unless every family has one HELP then one TYPE line before
    its samples, samples are contiguous and every sample line is well-formed."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    families: dict[str, list[str]] = {}
    current = None
    expect_type = None
    for line in text[:-1].split("\n"):
        if match := HELP.match(line):
            assert expect_type is None, f"HELP without TYPE before {line!r}"
            assert match[1] not in families, f"second HELP for {match[1]}"
            expect_type, current = match[1], None
            continue
        if match := TYPE.match(line):
            assert match[1] == expect_type, f"TYPE {match[1]} not right after its HELP"
            families[match[1]] = []
            current, expect_type = match[1], None
            continue
        assert not line.startswith("#"), f"stray comment {line!r}"
        match = SAMPLE.match(line)
        assert match, f"malformed sample line {line!r}"
        assert match[1] == current, f"sample {match[1]} outside its family ({current})"
        families[current].append(line)
    assert expect_type is None
    assert all(families.values()), "a family without samples"
    return families


# --- render ------------------------------------------------------------------------------

def test_verified_relaunch_exact():
    assert render(verified()) == EXPECTED_VERIFIED
    check_exposition(EXPECTED_VERIFIED)


def test_empty_last_relaunch_omits_every_last_relaunch_series():
    text = render(empty())
    assert text == EXPECTED_EMPTY
    assert "last_relaunch" not in text
    check_exposition(text)


def test_deterministic():
    assert render(verified()) == render(verified())
    shuffled = Metrics(staged=False, last_relaunch=dict(reversed(VERIFIED.items())),
                       relaunches_total={"verified": 3, "unverified": 1}, state="idle",
                       firmware_saved_usec=37035000)
    assert render(shuffled) == EXPECTED_VERIFIED


def test_label_values_escaped():
    last = dict(VERIFIED, id='say "hi"', image="C:\\efi\\new.efi\nsecond line")
    text = render(Metrics(staged=True, last_relaunch=last, relaunches_total={},
                          state='we"ird\\state\n'))
    assert 'relaunchd_state{state="we\\"ird\\\\state\\n"} 1\n' in text
    assert ('relaunchd_last_relaunch_info{id="say \\"hi\\"",method="txt",'
            'image="C:\\\\efi\\\\new.efi\\nsecond line"} 1\n') in text
    families = check_exposition(text)
    assert len(families["relaunchd_last_relaunch_info"]) == 1


@pytest.mark.parametrize("bad", ["yesterday", "", "2026-13-45T99:00:00+00:00", None, 17])
def test_unparsable_time_omits_only_the_timestamp(bad):
    text = render(Metrics(staged=False, last_relaunch=dict(VERIFIED, time=bad),
                          relaunches_total={}, state="idle"))
    families = check_exposition(text)
    assert "relaunchd_last_relaunch_timestamp_seconds" not in families
    assert families["relaunchd_last_relaunch_verified"] == ["relaunchd_last_relaunch_verified 1"]
    assert "relaunchd_last_relaunch_info" in families


def test_time_variants():
    def stamp(when: str) -> str:
        text = render(Metrics(staged=False, last_relaunch=dict(VERIFIED, time=when),
                              relaunches_total={}, state="idle"))
        return check_exposition(text)["relaunchd_last_relaunch_timestamp_seconds"][0]

    assert stamp("2026-11-22T10:00:00Z").endswith(" 1795341600")
    assert stamp("2026-11-22T11:00:00+01:00").endswith(" 1795341600")
    assert stamp("2026-11-22T10:00:00.25+00:00").endswith(" 1795341600.25")
    assert stamp("2026-11-22T10:00:00").endswith(" 1795341600")   # naive is read as UTC


def test_unknown_downtime_and_flags():
    last = dict(VERIFIED, verified=False, measured=False, drtm=False, downtime_ms=None)
    families = check_exposition(render(Metrics(staged=False, last_relaunch=last,
                                               relaunches_total={}, state="failed")))
    assert "relaunchd_last_relaunch_downtime_seconds" not in families
    for flag in ("verified", "measured", "drtm"):
        name = f"relaunchd_last_relaunch_{flag}"
        assert families[name] == [f"{name} 0"]
    del last["downtime_ms"]
    families = check_exposition(render(Metrics(staged=False, last_relaunch=last,
                                               relaunches_total={}, state="failed")))
    assert "relaunchd_last_relaunch_downtime_seconds" not in families
    last["downtime_ms"] = 0
    families = check_exposition(render(Metrics(staged=False, last_relaunch=last,
                                               relaunches_total={}, state="failed")))
    assert families["relaunchd_last_relaunch_downtime_seconds"] == [
        "relaunchd_last_relaunch_downtime_seconds 0"]


@pytest.mark.parametrize(("firmware_time", "gauge"), [
    ({"source": "systemd-boot", "firmware_usec": 1, "loader_usec": 2, "avoided_usec": 3,
      "reason": None}, ["relaunchd_last_relaunch_firmware_avoided_seconds 3e-06"]),
    ({"source": "unknown", "avoided_usec": None, "reason": "BIOS"}, None),
    ({"source": "unknown", "reason": "BIOS"}, None),       # None left out over D-Bus
    ({"source": "systemd-boot", "avoided_usec": 0, "reason": "firmware reboot: the fallback"},
     ["relaunchd_last_relaunch_firmware_avoided_seconds 0"]),
    ({"avoided_usec": -5}, None), ({"avoided_usec": True}, None),
    ({"avoided_usec": "12"}, None), (None, None), ("garbage", None), (["x"], None),
    ("omit", None),
])
def test_the_firmware_time_avoided_gauge_only_when_known(firmware_time, gauge):
    last = dict(VERIFIED, firmware_time=firmware_time)
    if firmware_time == "omit":                          # concluded by an older relaunchd
        del last["firmware_time"]
    families = check_exposition(render(Metrics(staged=False, last_relaunch=last,
                                               relaunches_total={}, state="idle")))
    assert families.get("relaunchd_last_relaunch_firmware_avoided_seconds") == gauge
    assert families["relaunchd_firmware_seconds_saved_total"] == [
        "relaunchd_firmware_seconds_saved_total 0"]


@pytest.mark.parametrize(("usec", "text"), [
    (0, "0"), (1, "1e-06"), (12345000, "12.345"), (3_600_000_000, "3600"),
    (123_456_789_012, "123456.789012"),
])
def test_seconds_saved_are_the_microseconds_exactly(usec, text):
    families = check_exposition(render(Metrics(staged=False, last_relaunch={},
                                               relaunches_total={}, state="idle",
                                               firmware_saved_usec=usec)))
    assert families["relaunchd_firmware_seconds_saved_total"] == [
        f"relaunchd_firmware_seconds_saved_total {text}"]


def test_unexpected_results_follow_the_known_ones():
    text = render(Metrics(staged=False, last_relaunch={}, state="idle",
                          relaunches_total={"zeta": 2, "aborted": 1, "verified": 5}))
    assert check_exposition(text)["relaunchd_relaunches_total"] == [
        'relaunchd_relaunches_total{result="verified"} 5',
        'relaunchd_relaunches_total{result="unverified"} 0',
        'relaunchd_relaunches_total{result="aborted"} 1',
        'relaunchd_relaunches_total{result="zeta"} 2',
    ]


def test_prometheus_client_parses_it():
    # The reference parser (python3-prometheus-client, installed by make setup).
    from prometheus_client import parser
    last = dict(VERIFIED, image='a"b\\c\nd')
    text = render(Metrics(staged=True, last_relaunch=last,
                          relaunches_total={"verified": 3, "unverified": 1}, state="idle",
                          firmware_saved_usec=37035000))
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    # prometheus_client names a counter family without its _total suffix.
    assert families["relaunchd_relaunches"].type == "counter"
    totals = {s.labels["result"]: s.value for s in families["relaunchd_relaunches"].samples}
    assert totals == {"verified": 3, "unverified": 1}
    info = families["relaunchd_last_relaunch_info"].samples[0]
    assert info.labels == {"id": "r-42", "method": "txt", "image": 'a"b\\c\nd'}
    assert families["relaunchd_last_relaunch_timestamp_seconds"].samples[0].value == 1795341600
    assert families["relaunchd_last_relaunch_downtime_seconds"].samples[0].value == 1.234
    saved = families["relaunchd_firmware_seconds_saved"]
    assert saved.type == "counter" and saved.samples[0].value == 37.035
    assert families["relaunchd_last_relaunch_firmware_avoided_seconds"].samples[0].value \
        == 12.345


# --- write_textfile ----------------------------------------------------------------------

def test_write_textfile_atomic_0644(tmp_path):
    path = tmp_path / "relaunchd.prom"
    old = os.umask(0o077)      # the final mode must not depend on the daemon's umask
    try:
        write_textfile(str(path), verified())
    finally:
        os.umask(old)
    assert path.read_text() == EXPECTED_VERIFIED
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["relaunchd.prom"]


def test_write_textfile_replaces_existing(tmp_path):
    path = tmp_path / "relaunchd.prom"
    path.write_text("stale\n")
    path.chmod(0o600)
    before = path.stat().st_ino
    write_textfile(str(path), empty())
    assert path.read_text() == EXPECTED_EMPTY
    assert path.stat().st_ino != before          # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_textfile(str(path), verified())
    assert path.read_text() == EXPECTED_VERIFIED
    assert os.listdir(tmp_path) == ["relaunchd.prom"]


def test_write_textfile_missing_directory(tmp_path):
    missing = tmp_path / "textfile_collector"
    with pytest.raises(OSError, match="directory does not exist") as info:
        write_textfile(str(missing / "relaunchd.prom"), verified())
    assert info.value.filename == str(missing)
    assert not missing.exists()
    assert os.listdir(tmp_path) == []


def test_write_textfile_temp_name_is_not_scraped(tmp_path, monkeypatch):
    """node-exporter reads `*.prom`: the temp file must never match while it is written."""
    import relaunchd.platform.atomic_file as atomicfile

    seen: list[str] = []
    real_rename = os.rename

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_rename(src, dst)

    monkeypatch.setattr(atomicfile.os, "rename", spy)
    write_textfile(str(tmp_path / "relaunchd.prom"), verified())
    assert len(seen) == 1 and not seen[0].endswith(".prom")


def test_write_textfile_failure_leaves_no_temp(tmp_path):
    target = tmp_path / "relaunchd.prom"
    target.mkdir()                                # rename over a directory fails
    with pytest.raises(OSError):
        write_textfile(str(target), verified())
    assert os.listdir(tmp_path) == ["relaunchd.prom"]
    assert target.is_dir()


# --------------------------------------------------------------------------- the exporter


@pytest.fixture
def env(tmp_path, keys) -> Env:
    """The engine over the in-memory FakeMachine (tests/support/engine_env.py)."""
    return make_env(tmp_path, str(keys["db"].cert))


def test_metrics_textfile(env, tmp_path):
    """The daemon's exporter follows the engine's changes (as daemon.serve wires it)."""
    prom = tmp_path / "textfile" / "relaunchd.prom"
    prom.parent.mkdir()
    exporters: list[TextfileExporter] = []

    def engine_with_exporter() -> Engine:
        def notify(names: set[str]) -> None:
            for exporter in exporters:
                exporter(names)

        engine = Engine(env.config, env.machine, notify=notify)
        exporters[:] = [TextfileExporter(engine, str(prom))]
        exporters[0].export()
        return engine

    engine = engine_with_exporter()
    relaunch_id = engine.stage(env.image)
    assert engine.wait(5) == "staged", relaunch_id
    assert "relaunchd_staged 1" in prom.read_text()
    assert "relaunchd_firmware_seconds_saved_total 0\n" in prom.read_text()
    engine.relaunch()
    engine.close()
    new_boot(env)
    env.machine.cold_boot = FirmwareTime("acpi-fpdt", firmware_usec=5855973,
                                         loader_usec=8469533)
    engine_with_exporter()
    text = prom.read_text()
    assert "relaunchd_last_relaunch_verified 1" in text
    assert 'relaunchd_relaunches_total{result="verified"} 1' in text
    assert "relaunchd_staged 0" in text
    assert "relaunchd_last_relaunch_firmware_avoided_seconds 14.325506\n" in text
    assert "relaunchd_firmware_seconds_saved_total 14.325506\n" in text
    check_exposition(text)


class StubEngine:
    """The engine as the exporter reads it: state, staged image, last relaunch, history."""

    def __init__(self) -> None:
        self.state = "idle"
        self.staged_image: dict = {}
        self.last_relaunch: dict = {}
        self.events: list[str] = []
        self.details: list[dict] = []          # per event, when a test sets them
        self.history_calls: list[int] = []

    def history(self, limit: int = 50) -> list[dict]:
        self.history_calls.append(limit)
        details = self.details or [{}] * len(self.events)
        return [{"time": "t", "event": e, "id": "r", "detail": d}
                for e, d in zip(self.events, details, strict=True)][:limit]


def test_the_exporter_writes_on_the_changes_it_watches(tmp_path):
    engine = StubEngine()
    path = tmp_path / "relaunchd.prom"
    exporter = TextfileExporter(engine, str(path))
    exporter({"progress"})                        # progress alone: nothing to write
    assert not path.exists()
    exporter({"progress", "state"})
    assert "relaunchd_staged 0" in path.read_text()
    engine.state, engine.staged_image = "staged", {"id": "r"}
    exporter({"staged_image"})
    text = path.read_text()
    assert "relaunchd_staged 1" in text and 'relaunchd_state{state="staged"} 1' in text
    check_exposition(text)


def test_the_exporter_rewrites_only_when_the_snapshot_changed(tmp_path, monkeypatch):
    engine = StubEngine()
    writes = []
    monkeypatch.setattr("relaunchd.prometheus.write_textfile",
                        lambda path, metrics: writes.append(metrics))
    exporter = TextfileExporter(engine, str(tmp_path / "x.prom"))
    exporter.export()
    exporter({"state"})                           # same state, same staged, same last
    assert len(writes) == 1
    engine.last_relaunch = {"id": "r-2", "verified": True, "time": "2026-12-02T10:00:00+00:00"}
    exporter({"last_relaunch"})
    assert len(writes) == 2 and writes[1].last_relaunch["id"] == "r-2"


def test_the_exporter_counts_relaunches_by_result_from_the_whole_history(tmp_path):
    engine = StubEngine()
    engine.events = ["relaunch-verified", "staged", "relaunch-unverified",
                     "relaunch-verified", "relaunch-started", "relaunch-aborted"]
    path = tmp_path / "x.prom"
    TextfileExporter(engine, str(path)).export()
    text = path.read_text()
    assert 'relaunchd_relaunches_total{result="verified"} 2' in text
    assert 'relaunchd_relaunches_total{result="unverified"} 1' in text
    assert engine.history_calls == [1 << 16]      # every entry the history keeps


def test_the_exporter_sums_the_firmware_time_the_concluded_relaunches_avoided(tmp_path):
    """Over the relaunch-verified/-unverified entries (the ones that concluded a relaunch);
    an unknown figure (null, or absent in an entry from an older relaunchd) counts 0."""
    engine = StubEngine()
    engine.events, engine.details = zip(*[
        ("relaunch-verified", {"firmware_avoided_usec": 12_345_000}),
        ("relaunch-unverified", {"firmware_avoided_usec": 0}),          # the fallback
        ("relaunch-verified", {"firmware_avoided_usec": None}),         # a BIOS boot
        ("relaunch-verified", {}),                                      # before this field
        ("relaunch-verified", {"firmware_avoided_usec": 7_000_001}),
        ("relaunch-unverified", {"firmware_avoided_usec": 1_000_000}),
        ("relaunch-started", {"firmware_avoided_usec": 99_000_000}),    # not a conclusion
        ("relaunch-verified", {"firmware_avoided_usec": -1}),           # nonsense: 0
    ], strict=True)
    path = tmp_path / "x.prom"
    TextfileExporter(engine, str(path)).export()
    families = check_exposition(path.read_text())
    assert families["relaunchd_firmware_seconds_saved_total"] == [
        "relaunchd_firmware_seconds_saved_total 20.345001"]


def test_without_a_path_the_exporter_does_nothing(tmp_path):
    engine = StubEngine()
    exporter = TextfileExporter(engine, None)
    exporter({"state"})
    exporter.export()
    assert engine.history_calls == [] and os.listdir(tmp_path) == []


def test_a_write_that_fails_is_logged_not_raised(tmp_path, caplog):
    exporter = TextfileExporter(StubEngine(), str(tmp_path / "missing-dir" / "x.prom"))
    exporter.export()
    assert any("cannot write the metrics textfile" in r.message and "missing-dir" in r.message
               for r in caplog.records)
