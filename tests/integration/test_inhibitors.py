"""logind inhibitor locks over a private dbus-daemon: python-dbusmock's logind template
with real Inhibit() locks (the test holds the fds, as a real holder would), a plain
dbusmock object for exact rows and for failures, and no logind at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from gi.repository import Gio, GLib

from relaunchd.bus.logind import LOGIND_MANAGER, LOGIND_NAME, LOGIND_PATH, list_inhibitors
from relaunchd.errors import RelaunchError
from relaunchd.platform.inhibitors import Inhibitor, LogindUnavailable, blocking_shutdown
from support.dbus_harness import PrivateBus

MOCK_IFACE = "org.freedesktop.DBus.Mock"

# On top of the harness's system-bus default policy: let the mock own logind's name
# and let anyone call it (what logind's own bus policy allows on a real system).
LOGIND_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow own="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.login1"/>
  </policy>
</busconfig>
"""


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def private_bus(tmp_path_factory) -> Iterator[PrivateBus]:
    policy = tmp_path_factory.mktemp("policy") / "logind.conf"
    policy.write_text(LOGIND_POLICY)
    bus = PrivateBus(policy=policy).start()
    yield bus
    bus.stop()


@pytest.fixture
def connection(private_bus) -> Iterator[Gio.DBusConnection]:
    con = Gio.DBusConnection.new_for_address_sync(
        private_bus.address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    con.set_exit_on_close(False)
    yield con
    if not con.is_closed():
        con.close_sync(None)


@pytest.fixture
def start_mock(private_bus) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `python -m dbusmock --system ARGS` owning logind's name; stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", *args],
                                env=private_bus.env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_until(lambda: proc.poll() is not None or private_bus.has_owner(LOGIND_NAME),
                   "the logind mock")
        assert proc.poll() is None, f"dbusmock exited {proc.returncode}"
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    wait_until(lambda: not private_bus.has_owner(LOGIND_NAME), "the logind mock to leave")


@pytest.fixture
def logind(start_mock) -> subprocess.Popen:
    """python-dbusmock's logind template: Inhibit() returns a fd, ListInhibitors lists the
    locks whose fd is still open (with a fixed uid 1000 and pid 123456)."""
    return start_mock("--template", "logind")


@pytest.fixture
def plain_logind(start_mock, connection) -> Callable[[str, str], None]:
    """A bare mock object on logind's name; returns `define(out_sig, code)`, which
    (re)defines ListInhibitors."""
    start_mock(LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER)

    def define(out_sig: str, code: str) -> None:
        connection.call_sync(LOGIND_NAME, LOGIND_PATH, MOCK_IFACE, "AddMethod",
                             GLib.Variant("(sssss)", ("", "ListInhibitors", "", out_sig,
                                                      code)),
                             None, Gio.DBusCallFlags.NONE, 5000, None)
    return define


class Locks:
    """Inhibitor locks taken like a real holder takes them (logind Inhibit → a fd)."""

    def __init__(self, connection: Gio.DBusConnection) -> None:
        self.connection = connection
        self.held: list[int] = []

    def take(self, what: str, who: str, why: str, mode: str) -> int:
        _, fds = self.connection.call_with_unix_fd_list_sync(
            LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER, "Inhibit",
            GLib.Variant("(ssss)", (what, who, why, mode)), GLib.VariantType("(h)"),
            Gio.DBusCallFlags.NONE, 5000, None, None)
        (fd,) = fds.steal_fds()
        self.held.append(fd)
        return fd

    def release(self, fd: int) -> None:
        # Forget it first: a closed fd number may be reused, and must not be closed twice.
        self.held.remove(fd)
        os.close(fd)

    def release_all(self) -> None:
        while self.held:
            self.release(self.held[-1])


@pytest.fixture
def locks(connection) -> Iterator[Locks]:
    held = Locks(connection)
    yield held
    held.release_all()


# --- the logind template -----------------------------------------------------------------

def test_no_inhibitors(logind, connection):
    assert list_inhibitors(connection) == []
    assert blocking_shutdown([]) == []


def test_block_shutdown_lock_blocks_delay_and_sleep_only_do_not(logind, connection, locks):
    locks.take("shutdown:sleep", "apt", "Installing packages", "block")
    locks.take("shutdown", "backup", "Flushing snapshot", "delay")
    locks.take("sleep", "player", "Playing a film", "block")
    found = list_inhibitors(connection)
    assert found == [
        Inhibitor("shutdown:sleep", "apt", "Installing packages", "block", 1000, 123456),
        Inhibitor("shutdown", "backup", "Flushing snapshot", "delay", 1000, 123456),
        Inhibitor("sleep", "player", "Playing a film", "block", 1000, 123456),
    ]
    assert blocking_shutdown(found) == [found[0]]


def test_released_lock_no_longer_listed(logind, connection, locks):
    fd = locks.take("shutdown", "apt", "Installing packages", "block")
    assert len(blocking_shutdown(list_inhibitors(connection))) == 1
    locks.release(fd)
    wait_until(lambda: list_inhibitors(connection) == [], "logind to drop the lock", 10)


def test_default_connection_is_the_system_bus(logind, locks, private_bus):
    """connection=None goes to the system bus (here DBUS_SYSTEM_BUS_ADDRESS) — in a child,
    so this process's shared system-bus singleton is left alone."""
    locks.take("shutdown:idle", "kured", "Draining", "block")
    out = _child(private_bus.env())
    assert out == {"inhibitors": [["shutdown:idle", "kured", "Draining", "block", 1000, 123456]],
                   "blocking": 1}


# --- exact rows and failures from a plain mock -------------------------------------------

def test_only_block_and_the_exact_shutdown_token_count(plain_logind, connection):
    plain_logind("a(ssssuu)", "ret = ["
                 "('idle:shutdown', 'gdm', 'x', 'block', 0, 900),"
                 "('handle-power-key:handle-shutdown-key', 'de', 'x', 'block', 1000, 901),"
                 "('shutdown', 'svc', 'x', 'delay', 0, 902),"
                 "('sleep', 'svc', 'x', 'block', 0, 903),"
                 "('shutdown', 'weird', 'x', 'Block', 0, 904)]")
    found = list_inhibitors(connection)
    assert [i.pid for i in found] == [900, 901, 902, 903, 904]
    assert found[0] == Inhibitor("idle:shutdown", "gdm", "x", "block", 0, 900)
    assert blocking_shutdown(found) == [found[0]]
    assert blocking_shutdown(iter(found)) == [found[0]]


def test_logind_absent(connection, private_bus):
    assert not private_bus.has_owner(LOGIND_NAME)
    with pytest.raises(LogindUnavailable, match="ServiceUnknown") as info:
        list_inhibitors(connection)
    assert info.value.name == "LogindUnavailable"
    assert isinstance(info.value, RelaunchError)


def test_no_system_bus(tmp_path, private_bus):
    env = dict(private_bus.env(), DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    out = _child(env)
    assert out["error"] == "LogindUnavailable"
    assert out["message"].startswith("no system bus:")


def test_closed_connection(connection):
    connection.close_sync(None)
    with pytest.raises(LogindUnavailable, match="closed"):
        list_inhibitors(connection)


def test_failing_method_names_the_dbus_error(plain_logind, connection):
    plain_logind("a(ssssuu)", "raise dbus.exceptions.DBusException('logind is confused', "
                 "name='org.freedesktop.login1.TestFailure')")
    with pytest.raises(RelaunchError) as info:
        list_inhibitors(connection)
    assert type(info.value) is RelaunchError
    assert str(info.value) == ("logind ListInhibitors failed: "
                               "org.freedesktop.login1.TestFailure: logind is confused")


def test_slow_method_times_out(plain_logind, connection):
    plain_logind("a(ssssuu)", "time.sleep(2); ret = []")
    started = time.monotonic()
    with pytest.raises(RelaunchError) as info:
        list_inhibitors(connection, timeout_ms=200)
    assert time.monotonic() - started < 1.5
    assert type(info.value) is RelaunchError
    assert str(info.value) == "logind ListInhibitors failed: no answer within 200 ms"


def test_wrong_reply_type_is_an_error_not_garbage(plain_logind, connection):
    plain_logind("as", "ret = ['shutdown']")
    with pytest.raises(RelaunchError, match=r"\(a\(ssssuu\)\)") as info:
        list_inhibitors(connection)
    assert type(info.value) is RelaunchError


# --- helpers -----------------------------------------------------------------------------

CHILD = """
import json
from relaunchd.bus.logind import list_inhibitors
from relaunchd.platform.inhibitors import LogindUnavailable, blocking_shutdown
try:
    found = list_inhibitors(timeout_ms=5000)
except LogindUnavailable as exc:
    print(json.dumps({"error": exc.name, "message": str(exc)}))
else:
    print(json.dumps({"inhibitors": [[i.what, i.who, i.why, i.mode, i.uid, i.pid]
                                     for i in found],
                      "blocking": len(blocking_shutdown(found))}))
"""


def _child(env: dict[str, str]) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return json.loads(run.stdout)
