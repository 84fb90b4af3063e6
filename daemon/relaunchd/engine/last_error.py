"""The LastError property's values, and how any exception becomes a named error."""

from __future__ import annotations

from relaunchd.engine import state
from relaunchd.errors import RelaunchError


def as_error(exc: BaseException) -> RelaunchError:
    if isinstance(exc, RelaunchError):
        return exc
    if isinstance(exc, OSError):
        return RelaunchError(f"{exc.strerror or exc}" + (f": {exc.filename}"
                                                        if exc.filename else ""))
    return RelaunchError(f"internal error: {type(exc).__name__}: {exc}")


def error_json(error: RelaunchError, message: str | None = None) -> dict:
    return {"name": error.name, "message": str(error) if message is None else message,
            "time": state.now()}


def kexec_loaded_text(value: bool | None) -> str:
    """/sys/kernel/kexec_loaded as read, for messages."""
    return {True: "1", False: "0", None: "unreadable"}[value]
