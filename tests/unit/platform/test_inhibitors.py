"""logind inhibitor locks (relaunchd.platform.inhibitors): which locks make a kexec wait —
mode `block` on the `shutdown` operation (org.freedesktop.login1(5): kexec is a shutdown;
`delay` locks only postpone it) — and the record's operations.
tests/integration/test_inhibitors.py asks a real logind (python-dbusmock) over D-Bus."""

from __future__ import annotations

import pytest

from relaunchd.errors import RelaunchError
from relaunchd.platform.inhibitors import (
    Inhibitor,
    InhibitorSource,
    LogindUnavailable,
    blocking_shutdown,
)


def lock(what: str, mode: str, who: str = "x") -> Inhibitor:
    return Inhibitor(what, who, "why", mode, 0, 1)


@pytest.mark.parametrize(("what", "mode", "blocks"), [
    ("shutdown", "block", True),
    ("sleep:shutdown:idle", "block", True),
    ("shutdown", "delay", False),
    ("sleep", "block", False),
    ("handle-power-key:handle-reboot-key", "block", False),   # keys, not the shutdown itself
    ("shutdown", "block-weak", False),                          # systemd >= 257: not enforced
    ("shutdownx", "block", False),                              # operations, not substrings
])
def test_which_locks_block_a_relaunch(what, mode, blocks):
    assert bool(blocking_shutdown([lock(what, mode)])) is blocks


def test_the_blocking_locks_keep_their_order():
    locks = [lock("shutdown", "block", "a"), lock("sleep", "block", "b"),
             lock("shutdown:sleep", "block", "c"), lock("shutdown", "delay", "d")]
    assert [i.who for i in blocking_shutdown(locks)] == ["a", "c"]
    assert blocking_shutdown(iter(locks)) == blocking_shutdown(locks)    # any iterable
    assert blocking_shutdown([]) == []


def test_operations():
    assert lock("sleep:shutdown", "block").operations == frozenset({"sleep", "shutdown"})


def test_logind_unavailable_is_a_named_relaunch_error():
    error = LogindUnavailable("no system bus")
    assert isinstance(error, RelaunchError) and error.name == "LogindUnavailable"


def test_a_source_is_anything_that_lists_inhibitors():
    class Static:
        def list_inhibitors(self) -> list[Inhibitor]:
            return [lock("shutdown", "block")]

    source: InhibitorSource = Static()
    assert blocking_shutdown(source.list_inhibitors())[0].mode == "block"
