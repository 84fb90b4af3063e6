"""Named errors (relaunchd.errors): one class per name, found by name (the D-Bus reply and
LastError carry only the name), a configuration error that says where, and no error that
prints as an empty string."""

from __future__ import annotations

import pytest

from relaunchd import errors
from relaunchd.errors import ConfigError, NoTpm, NotReady, RelaunchError, TpmFailed


def test_each_name_is_one_class():
    names = [cls.name for cls in errors.all_errors()]
    assert len(names) == len(set(names)) and len(names) > 20
    for cls in errors.all_errors():
        assert errors.error_named(cls.name) is cls


def test_unknown_names_and_other_modules_classes_are_not_found():
    class Elsewhere(RelaunchError):
        name = "Elsewhere"

    assert errors.error_named("Elsewhere") is None
    assert errors.error_named("NoSuchError") is None


def test_an_error_without_a_message_prints_its_name():
    assert str(errors.Busy()) == "Busy" and str(errors.Busy("another stage")) == "another stage"


def test_tpm_errors_are_readiness_errors():
    """The engine refuses a relaunch on NotReady; NoTpm may be waived by configuration,
    TpmFailed never (engine.relaunch.measure)."""
    assert issubclass(NoTpm, NotReady) and issubclass(TpmFailed, NotReady)
    assert NoTpm.name != TpmFailed.name


@pytest.mark.parametrize(("kw", "text"), [
    ({}, "bad value"),
    ({"file": "relaunchd.yaml"}, "relaunchd.yaml: bad value"),
    ({"file": "relaunchd.yaml", "line": 7}, "relaunchd.yaml, line 7: bad value"),
    ({"file": "r.yaml", "line": 7, "column": 3}, "r.yaml, line 7, column 3: bad value"),
    ({"line": 2}, "line 2: bad value"),
])
def test_a_configuration_error_says_where(kw, text):
    error = ConfigError("bad value", key="launch.method", **kw)
    assert str(error) == text and error.name == "InvalidConfig"
    assert error.key == "launch.method" and error.line == kw.get("line")
