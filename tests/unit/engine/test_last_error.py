"""The LastError property's values (relaunchd.engine.last_error): any exception becomes a
named error without a traceback, with the time it happened."""

from __future__ import annotations

import datetime
import errno

from relaunchd.engine.last_error import as_error, error_json, kexec_loaded_text
from relaunchd.errors import KexecFailed, RelaunchError


def test_a_named_error_stays_itself():
    error = KexecFailed("EPERM")
    assert as_error(error) is error


def test_an_os_error_names_what_failed_and_where():
    error = as_error(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x"))
    assert type(error) is RelaunchError and error.name == "Failed"
    assert str(error) == "No space left on device: /var/lib/x"
    assert str(as_error(OSError(errno.EIO, "Input/output error"))) == "Input/output error"


def test_anything_else_is_an_internal_error_naming_its_type():
    error = as_error(ZeroDivisionError("division by zero"))
    assert error.name == "Failed"
    assert str(error) == "internal error: ZeroDivisionError: division by zero"


def test_the_json_form():
    shown = error_json(KexecFailed("kexec_file_load failed with EPERM"))
    assert set(shown) == {"name", "message", "time"}
    assert shown["name"] == "KexecFailed" and shown["message"].endswith("EPERM")
    when = datetime.datetime.fromisoformat(shown["time"])
    assert when.tzinfo is not None and abs(
        (datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 60
    assert error_json(KexecFailed("x"), "told otherwise")["message"] == "told otherwise"


def test_kexec_loaded_as_read():
    assert [kexec_loaded_text(v) for v in (True, False, None)] == ["1", "0", "unreadable"]
