"""`relaunchd.daemon.main` with an injected engine factory, on a private system-type bus:
the factory gets the configuration `main` loaded and a notify callback; the engine is
published, READY=1 and STATUS follow it, a property change reaches the bus, and SIGTERM
stops the loop, closes the engine and exits 0. The process is a child of the test
(`main` installs signal handlers and runs the GLib main loop), bounded in time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from relaunchd.bus import client as bus_client
from support.dbus_harness import SUPPORT, PrivateBus

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the bus policy)")

CHILD = textwrap.dedent("""
    import json, sys, threading
    sys.path.insert(0, sys.argv[1])
    import dbus_fake_engine
    from relaunchd import daemon

    record = sys.argv[2]

    class Recorded(dbus_fake_engine.Engine):
        def close(self):
            with open(record, "a") as f:
                f.write(json.dumps({"closed": True}) + "\\n")
            super().close()

    def make_engine(config, notify):
        with open(record, "a") as f:
            f.write(json.dumps({"config": config.state_dir,
                                "notify": callable(notify)}) + "\\n")
        engine = Recorded(config, notify=notify)
        # a change the engine announces later, from another thread
        threading.Timer(1.0, lambda: engine._set(state="failed")).start()
        return engine

    sys.exit(daemon.main(sys.argv[3:], load=dbus_fake_engine.load_config,
                         make_engine=make_engine))
""")


@pytest.fixture
def bus():
    b = PrivateBus().start()
    yield b
    b.stop()


def test_main_serves_the_injected_engine(bus, tmp_path):
    for d in ("state", "run", "images"):
        (tmp_path / d).mkdir()
    config = tmp_path / "relaunchd.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state"),
                                  "runtime_dir": str(tmp_path / "run"),
                                  "image_dirs": [str(tmp_path / "images")]}))
    record = tmp_path / "record.jsonl"
    notify_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(20)
    env = bus.env()
    env["NOTIFY_SOCKET"] = notify_path      # bus.env() drops the caller's; this is ours
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(SUPPORT), str(record),
                             "--config", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # The reporter's first STATUS, then READY=1 once the name is owned.
        messages = [sock.recv(4096).decode(), sock.recv(4096).decode()]
        assert messages == ["STATUS=idle", "READY=1\nSTATUS=idle"]
        client = bus_client.Client(address=bus.address, timeout_ms=10_000)
        assert client.get("Version") == "0.1.0-fake"
        deadline = time.monotonic() + 20
        while client.get("State") != "failed":          # the engine's change, published
            assert time.monotonic() < deadline
            time.sleep(0.05)
        messages.append(sock.recv(4096).decode())
        assert "STATUS=failed" in messages
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        sock.close()
    assert proc.returncode == 0, out
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines == [{"config": str(tmp_path / "state"), "notify": True}, {"closed": True}]
    assert not bus.has_owner("org.relaunchd.Relaunch1")
