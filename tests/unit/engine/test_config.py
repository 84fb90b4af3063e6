"""The configuration values (relaunchd.engine.config): frozen records, their JSON form and
the probe configuration they name. Reading the file is tests/unit/engine/test_config_file.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from relaunchd.engine.config import (
    Config,
    LaunchConfig,
    MeasurementConfig,
    QuiesceConfig,
    TxtConfig,
)
from relaunchd.platform.probe_config import ProbeConfig


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.root = "/x"   # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.launch.method = "txt"   # type: ignore[misc]


def test_the_json_form_is_the_files_keys_with_lists():
    config = Config(image_dirs=("/boot",), source="/etc/relaunchd/relaunchd.yaml",
                    notes=("read",))
    data = config.to_json()
    assert "source" not in data and "notes" not in data           # not keys of the file
    assert data["image_dirs"] == ["/boot"]                         # tuples as lists
    assert data["launch"] == {"method": "auto", "require_drtm": False, "loader": None,
                              "fallback": "none", "sealed_volumes": "block"}
    assert json.loads(json.dumps(data)) == data
    keys = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    assert set(data) == keys


def test_the_probe_looks_where_the_configuration_says():
    config = Config(root="/srv/fixture", txt=TxtConfig(sinit_acm_dirs=("/opt/acm",),
                                                       dl_handler="/opt/dl.bin"))
    probe = config.probe_config()
    assert probe == ProbeConfig(root="/srv/fixture", acm_dirs=("/opt/acm",),
                                dl_handler="/opt/dl.bin")
    assert Config().probe_config() == ProbeConfig()               # defaults are the probe's


def test_equality_ignores_where_the_values_came_from():
    assert Config(source="/a", notes=("x",)) == Config()


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: Config(root="relative"), "absolute"),
    (lambda: Config(launch=LaunchConfig(method="grub")), "must be one of"),
    (lambda: Config(measurement=MeasurementConfig(pcr=24)), "PCR"),
    (lambda: Config(measurement=MeasurementConfig(banks=("md5",))), "md5"),
    (lambda: Config(quiesce=QuiesceConfig(unbind_devices=("eth0",))), "eth0"),
])
def test_the_checks_are_attached_to_the_fields(make, fragment):
    """Each field carries its check (what config_file applies to every value); here
    applied directly to the value a caller would put there."""
    config = make()
    failures = []
    for section in (config, config.launch, config.measurement, config.quiesce):
        for f in dataclasses.fields(section):
            check = f.metadata.get("check")
            if check is not None:
                problem = check(getattr(section, f.name))
                if problem:
                    failures.append(problem)
    assert any(fragment in p for p in failures), failures
