"""A private system-type dbus-daemon with the shipped policy, relaunchd on it, and a
python-dbusmock polkitd — every process bounded and killed by its owner.

The bus config copies the system bus's default policy (deny method calls and name
ownership unless a service file punches holes) and `<include>`s
units/org.relaunchd.Relaunch1.conf, so what nobody may do here is what nobody may do
on a real system bus. The socket lives in a world-traversable directory and is made
connectable for `runuser -u nobody` clients.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
SUPPORT = Path(__file__).resolve().parent
POLICY = REPO / "units" / "org.relaunchd.Relaunch1.conf"
BUS_NAME = "org.relaunchd.Relaunch1"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <!-- test-only: the polkitd mock (python-dbusmock) and its control interface, as
       polkitd's own policy file allows on a real system -->
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 5) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class PrivateBus:
    def __init__(self, policy: Path = POLICY) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relaunchd-bus-", dir="/tmp"))
        self.dir.chmod(0o755)   # nobody must reach the socket
        self.socket = self.dir / "bus.sock"
        self.config = self.dir / "bus.conf"
        self.config.write_text(BUS_CONFIG.format(socket=self.socket, policy=policy))
        self.address = f"unix:path={self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateBus:
        # umask 0: the listening socket must be connectable by other uids.
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--nopidfile"],
            preexec_fn=lambda: os.umask(0), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        _wait_for(self.socket.exists, 10, "dbus-daemon socket")
        return self

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(DBUS_SYSTEM_BUS_ADDRESS=self.address, PYTHONPATH=str(SUPPORT),
                   PYTHONDONTWRITEBYTECODE="1", **extra)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        return env

    def has_owner(self, name: str) -> bool:
        out = subprocess.run(
            ["busctl", f"--address={self.address}", "call", "org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner", "s", name],
            capture_output=True, text=True, timeout=10)
        return out.stdout.strip() == "b true"

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """relaunchd's service on a PrivateBus, over `engine`: "fake-engine" (default) or
    "fake-machine" (daemon_under_test.py), or "installed" (.venv/bin/relaunchd itself)."""

    def __init__(self, bus: PrivateBus, config: Path, *, engine: str = "fake-engine",
                 env: dict[str, str] | None = None) -> None:
        self.bus = bus
        self.config = config
        self.engine = engine
        self.env = bus.env(**dict(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log = bus.dir / f"relaunchd-{time.monotonic_ns()}.log"

    def start(self, wait: bool = True) -> Daemon:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*daemon_command(self.engine), "--config", str(self.config)], env=self.env,
                stdout=log, stderr=subprocess.STDOUT)
        if wait:
            def ready() -> bool:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"relaunchd exited {self.proc.returncode}: "
                                       f"{self.output()}")
                return self.bus.has_owner(BUS_NAME)
            _wait_for(ready, 20, "relaunchd on the bus")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        _stop(self.proc, sig)
        _wait_for(lambda: not self.bus.has_owner(BUS_NAME), 10, "the name to be released")
        return self.proc.returncode if self.proc else None


def daemon_command(engine: str) -> list[str]:
    if engine == "installed":
        return [str(VENV_BIN / "relaunchd")]
    return [str(VENV_BIN / "python"), str(SUPPORT / "daemon_under_test.py"), engine]


class PolkitMock:
    """python-dbusmock's polkitd template on the bus; `allow(...)` sets the allowed actions."""

    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus
        self.proc: subprocess.Popen | None = None

    def start(self) -> PolkitMock:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=self.bus.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: self.bus.has_owner("org.freedesktop.PolicyKit1"), 20, "polkitd mock")
        return self

    def allow(self, *actions: str) -> None:
        subprocess.run(
            ["busctl", f"--address={self.bus.address}", "call", "org.freedesktop.PolicyKit1",
             "/org/freedesktop/PolicyKit1/Authority", "org.freedesktop.DBus.Mock",
             "SetAllowed", "as", str(len(actions)), *actions],
            check=True, capture_output=True, timeout=10)

    def stop(self) -> None:
        _stop(self.proc)
        _wait_for(lambda: not self.bus.has_owner("org.freedesktop.PolicyKit1"), 10,
                  "polkitd mock to leave")


def write_config(directory: Path, image_dir: Path, **extra) -> Path:
    """A fake-engine config (YAML) with state and runtime under `directory`."""
    import yaml

    data = {"root": "/", "state_dir": str(directory / "state"),
            "runtime_dir": str(directory / "run"), "image_dirs": [str(image_dir)], **extra}
    (directory / "state").mkdir(exist_ok=True)
    (directory / "run").mkdir(exist_ok=True)
    path = directory / "relaunchd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@functools.cache
def _world_readable_package() -> str:
    """A copy of the relaunchd package that any user can import.

    The checkout (and its .venv) may sit in a directory only root can enter
    (a `mktemp -d` clone, a CI workspace), so an unprivileged client runs
    Debian's python3 (which has pydbus/gi) on this copy instead. Made once per
    process, removed at exit."""
    import atexit
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="relaunchd-client-")
    os.chmod(top, 0o755)
    package = Path(__file__).resolve().parents[2] / "daemon" / "relaunchd"
    shutil.copytree(package, os.path.join(top, "relaunchd"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    atexit.register(shutil.rmtree, top, True)
    return top


def relaunchctl(bus: PrivateBus, *args: str, user: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "relaunchctl"), *args]
    env = bus.env()
    if user:
        cmd = ["runuser", "-u", user, "--", "env", f"PYTHONPATH={_world_readable_package()}",
               "/usr/bin/python3", "-m", "relaunchd.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
