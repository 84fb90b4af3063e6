"""relaunchd on a private system-type bus with the shipped policy, over a fake engine
(tests/support/dbus_fake_engine.py, held to the real engine by test_engine_contract.py):
every method and property, the CLI in both formats, the bus policy and polkit as root and
as nobody, concurrency and sd_notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from relaunchd.bus import client as bus_client
from relaunchd.bus import error_names, names
from relaunchd.errors import AccessDenied, Busy, InvalidArgument, InvalidImage, NoDaemon, NotStaged
from support import ukibuild
from support.dbus_harness import (
    VENV_BIN,
    Daemon,
    PolkitMock,
    PrivateBus,
    daemon_command,
    relaunchctl,
    write_config,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runuser, bus policy)")

MANAGER = names.INTERFACE


@pytest.fixture(scope="module")
def private_bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def small_uki(tmp_path_factory) -> bytes:
    """A real UKI (Debian's stub): Inspect and ListImages parse what they are given."""
    return ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", b"ID=debian\n"), (".uname", b"6.1.0-bus"), (".linux", b"MZ" + bytes(4096)),
    ]), tmp_path_factory.mktemp("uki") / "uki.efi").read_bytes()


@pytest.fixture
def images(tmp_path, small_uki) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "uki.efi").write_bytes(small_uki)
    (d / "a.efi").write_bytes(os.urandom(3 << 20))
    (d / "big.efi").write_bytes(os.urandom(8 << 20))
    (d / "bad.efi").write_bytes(os.urandom(1 << 20))
    (d / "failrelaunch.efi").write_bytes(os.urandom(1 << 20))
    return d


@pytest.fixture
def daemon(private_bus, tmp_path, images):
    d = Daemon(private_bus, write_config(tmp_path, images, chunk_delay=0.05)).start()
    yield d
    d.stop()


@pytest.fixture
def client(private_bus, daemon):
    return bus_client.Client(address=private_bus.address, timeout_ms=20_000)


def gdbus(private_bus, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["gdbus", "call", "--system", "-d", names.BUS_NAME, "-o", names.OBJECT_PATH, *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, env=private_bus.env(), capture_output=True, text=True,
                          timeout=30)


def wait_state(client, wanted: set[str], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("State")
        if state in wanted:
            return state
        time.sleep(0.02)
    raise AssertionError(f"state never became {wanted}")


# --- properties and methods -------------------------------------------------------------

def test_every_property(client, private_bus):
    props = client.properties()
    assert set(props) == {"State", "Progress", "StagedImage", "Capabilities", "CanRelaunch",
                          "LastRelaunch", "LastError", "Version"}
    assert props["State"] == "idle" and props["CanRelaunch"] == "no"
    assert props["Version"] == "0.1.0-fake"
    assert props["Capabilities"]["kexec"] == {"ready": True, "reasons": []}   # a{sv} in a{sv}
    assert props["Capabilities"]["txt"]["reasons"] == ["cpu-no-smx"]          # av
    assert props["Capabilities"]["best"] == "kexec"
    assert props["Progress"] == {"step": "", "done": 0, "total": 0, "percent": 0}
    for name, value in props.items():
        assert client.get(name) == value
    out = gdbus(private_bus, "-m", "org.freedesktop.DBus.Properties.Set", MANAGER, "State",
                "<'staged'>")
    assert out.returncode != 0 and "not writable" in out.stderr    # GDBus checks the XML
    out = gdbus(private_bus, "-m", "org.freedesktop.DBus.Properties.Get", MANAGER, "Nope")
    assert out.returncode != 0 and "Nope" in out.stderr


def test_introspection_is_the_shipped_xml(private_bus, daemon):
    out = subprocess.run(["gdbus", "introspect", "--system", "-d", names.BUS_NAME, "-o",
                          names.OBJECT_PATH, "--xml"], env=private_bus.env(),
                         capture_output=True, text=True, timeout=20)
    for member in ("Check", "ListImages", "Inspect", "Stage", "Relaunch", "Cancel",
                   "GetHistory", "LastRelaunch", "CanRelaunch"):
        assert f'name="{member}"' in out.stdout


def test_read_only_methods(client, images):
    report = client.call("Check", options={"method": "txt"})
    assert report["method"] == "txt" and report["ready"] is False
    assert report["best"] == "kexec"
    assert report["methods"]["kexec"]["checks"][1] == {
        "id": "tpm-2.0", "message": "TPM 2.0 present", "remedy": "", "ok": True}
    assert report["facts"]["tpm.version"]["value"] == 2
    # A fact that could not be read has no value: None values are left out.
    assert report["facts"]["iommu.units"] == {"source": "/sys/class/iommu",
                                              "error": "not-present"}
    listed = [i for i in client.call("ListImages") if i["kind"] == "image"]
    assert [i["path"] for i in listed] == sorted(str(p) for p in images.iterdir())
    by_name = {Path(i["path"]).name: i for i in listed}
    assert by_name["uki.efi"]["uname"] == "6.1.0-bus" and "error" not in by_name["uki.efi"]
    assert "not a PE image" in by_name["a.efi"]["error"]
    assert client.call("GetHistory", options={"limit": 5}) == []
    info = client.call("Inspect", str(images / "uki.efi"), options={"profile": 0})
    assert info["os_release"] == {"ID": "debian"} and info["uname"] == "6.1.0-bus"
    assert "pcrsig" not in info and "profile" not in info      # None values are left out


def test_named_errors(client, images):
    with pytest.raises(InvalidArgument, match="absolute"):
        client.call("Stage", "a.efi")
    with pytest.raises(InvalidArgument, match="unknown option 'froce'"):
        client.call("Relaunch", options={"froce": True})
    with pytest.raises(InvalidArgument, match="must be a boolean"):
        client.call("Relaunch", options={"force": "yes"})
    with pytest.raises(InvalidImage, match="no such file"):
        client.call("Inspect", str(images / "missing.efi"))
    with pytest.raises(InvalidArgument, match="profile 9"):
        client.call("Inspect", str(images / "uki.efi"), options={"profile": 9})
    with pytest.raises(InvalidImage, match="not a PE image"):
        client.call("Inspect", str(images / "a.efi"))
    with pytest.raises(NotStaged):
        client.call("Relaunch")
    with pytest.raises(InvalidArgument):
        client.call("GetHistory", options={"limit": -1})


def test_stage_emits_properties_changed(client, images):
    watch = client.watch()
    try:
        ident = client.call("Stage", str(images / "a.efi"))
        seen: list[dict] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                c.get("State") == "staged" for c in seen):
            seen.extend(watch.next(1))
    finally:
        watch.close()
    states = [c["State"] for c in seen if "State" in c]
    assert states[0] == "staging" and states[-1] == "staged"
    assert any("Progress" in c and c["Progress"].get("done") for c in seen)
    assert client.get("StagedImage")["id"] == ident
    assert client.get("CanRelaunch") == "yes"


def test_two_stages_at_once_one_busy(client, images, private_bus):
    results: list[object] = []

    def stage() -> None:
        c = bus_client.Client(address=private_bus.address)
        try:
            results.append(c.call("Stage", str(images / "big.efi")))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=stage) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(type(r).__name__ for r in results) == ["Busy", "str"]
    assert wait_state(client, {"staged"}) == "staged"


def test_cancel_during_staging(client, images):
    client.call("Stage", str(images / "big.efi"))
    assert client.get("State") == "staging"
    client.call("Cancel")
    # As the real engine: the stage is asked to stop, and ends in idle soon after.
    assert client.get("Progress")["step"] in ("cancelling", "verifying") \
        or client.get("State") == "idle"
    assert wait_state(client, {"idle"}) == "idle"
    assert client.get("StagedImage") == {}
    assert client.call("GetHistory")[0]["event"] == "cancelled"
    with pytest.raises(NotStaged):
        client.call("Cancel")


def test_bus_stays_responsive_while_staging(client, images):
    client.call("Stage", str(images / "big.efi"))
    worst = 0.0
    while client.get("State") == "staging":
        start = time.perf_counter()
        client.properties()
        worst = max(worst, time.perf_counter() - start)
    assert worst < 0.5


# --- the CLI ----------------------------------------------------------------------------

def test_cli_stage_status_images_history_cancel(private_bus, daemon, images):
    r = relaunchctl(private_bus, "stage", str(images / "a.efi"))
    assert r.returncode == 0, r.stderr
    assert "staged, id" in r.stdout
    r = relaunchctl(private_bus, "status")
    assert r.returncode == 0 and "State:        staged" in r.stdout
    status = json.loads(relaunchctl(private_bus, "status", "--json").stdout)
    assert status["State"] == "staged" and status["StagedImage"]["path"].endswith("a.efi")
    r = relaunchctl(private_bus, "images")
    assert r.returncode == 0 and f"  {images / 'uki.efi'}" in r.stdout
    assert f"* {images / 'a.efi'}" in r.stdout                  # the staged one, marked
    listed = [i for i in json.loads(relaunchctl(private_bus, "images", "--json").stdout)
              if i["kind"] == "image"]
    assert {i["path"] for i in listed} == {str(p) for p in images.iterdir()}
    r = relaunchctl(private_bus, "cancel", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"cancelled": True, "state": "idle"}
    r = relaunchctl(private_bus, "stage", "--json", str(images / "a.efi"))
    assert r.returncode == 0 and json.loads(r.stdout)["staged"]["kernel_sha256"]
    r = relaunchctl(private_bus, "cancel")
    assert r.returncode == 0 and "relaunchd is idle" in r.stdout
    r = relaunchctl(private_bus, "history")
    assert r.returncode == 0 and "unstaged" in r.stdout
    history = json.loads(relaunchctl(private_bus, "history", "--json").stdout)
    assert [h["event"] for h in history] == ["unstaged", "staged", "unstaged", "staged"]


def test_cli_stage_failure_exit_codes(private_bus, daemon, images):
    r = relaunchctl(private_bus, "stage", str(images / "bad.efi"))
    assert r.returncode == 1 and "VerificationFailed:" in r.stderr
    r = relaunchctl(private_bus, "stage", "--json", str(images / "nope.efi"))
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["name"] == "InvalidImage"
    r = relaunchctl(private_bus, "relaunch")
    assert r.returncode == 1 and "NotStaged:" in r.stderr


def test_cli_relaunch_wait(private_bus, daemon, images):
    assert relaunchctl(private_bus, "stage", str(images / "a.efi")).returncode == 0
    r = relaunchctl(private_bus, "relaunch", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "relaunching"
    history = json.loads(relaunchctl(private_bus, "history", "--json").stdout)
    assert history[0]["event"] == "relaunch-started"
    r = relaunchctl(private_bus, "history")
    assert r.returncode == 0 and "relaunch-started" in r.stdout


def test_cli_relaunch_wait_failure(private_bus, daemon, images):
    assert relaunchctl(private_bus, "stage", str(images / "failrelaunch.efi")).returncode == 0
    r = relaunchctl(private_bus, "relaunch", "--wait")
    assert r.returncode == 1 and "KexecFailed:" in r.stderr


def test_cli_relaunch_wait_daemon_goes_away(private_bus, daemon, client, images):
    """The system going down looks like relaunchd leaving the bus: that is success."""
    (images / "slow.efi").write_bytes(b"x" * 4096)
    assert relaunchctl(private_bus, "stage", str(images / "slow.efi")).returncode == 0
    proc = subprocess.Popen([str(VENV_BIN / "relaunchctl"), "relaunch", "--wait"],
                            env=private_bus.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_state(client, {"quiescing"})
        time.sleep(0.5)           # the reply is out; the fake quiesces for 3 s
        daemon.stop(signal.SIGKILL)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "going down" in out


def test_cli_without_daemon(private_bus, tmp_path):
    r = relaunchctl(private_bus, "status")
    assert r.returncode == 1 and "NoDaemon:" in r.stderr
    r = relaunchctl(private_bus, "stage", str(tmp_path / "x.efi"))   # falls back to local
    assert r.returncode == 2 and "NoDaemon" not in r.stderr


# --- authorization: bus policy and polkit -----------------------------------------------

MUTATING = [("Stage", ["{path}", "{{}}"]), ("Relaunch", ["{{}}"]), ("Cancel", ["{{}}"]),
            ("Inspect", ["{path}", "{{}}"])]


def test_nobody_reads_but_cannot_act(private_bus, daemon, images):
    r = relaunchctl(private_bus, "status", "--json", user="nobody")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["State"] == "idle"
    for cmd in (["images"], ["history"]):
        assert relaunchctl(private_bus, *cmd, user="nobody").returncode == 0
    assert gdbus(private_bus, "-m", f"{MANAGER}.Check", "{}", user="nobody").returncode == 0
    # polkitd absent: only uid 0 may act
    path = str(images / "a.efi")
    for method, args in MUTATING:
        out = gdbus(private_bus, "-m", f"{MANAGER}.{method}",
                    *[a.format(path=path) for a in args], user="nobody")
        assert out.returncode != 0 and "AccessDenied" in out.stderr, (method, out.stderr)
    for cmd in (["stage", path], ["cancel"], ["relaunch", "--wait"]):
        r = relaunchctl(private_bus, *cmd, user="nobody")
        assert r.returncode == 1 and "AccessDenied:" in r.stderr, (cmd, r.stderr)
    assert relaunchctl(private_bus, "status", "--json").returncode == 0
    assert json.loads(relaunchctl(private_bus, "status", "--json").stdout)["State"] == "idle"


def test_bus_policy_denies_nobody(private_bus, daemon):
    out = gdbus(private_bus, "-m", "org.freedesktop.DBus.Properties.Set", MANAGER, "State",
                "<'x'>", user="nobody")
    assert "AccessDenied" in out.stderr and "Rejected send message" in out.stderr
    out = subprocess.run(
        ["runuser", "-u", "nobody", "--", "gdbus", "call", "--system", "-d",
         "org.freedesktop.DBus", "-o", "/org/freedesktop/DBus", "-m",
         "org.freedesktop.DBus.RequestName", names.BUS_NAME, "4"],
        env=private_bus.env(), capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "not allowed to own" in out.stderr


def test_name_cannot_be_taken_twice(private_bus, daemon, tmp_path, images):
    second = Daemon(private_bus, write_config(tmp_path, images))
    second.start(wait=False)
    assert second.proc.wait(20) == 1
    assert "already owned" in second.output()


def test_polkit_decides(private_bus, daemon, client, images):
    mock = PolkitMock(private_bus).start()
    try:
        path = str(images / "a.efi")
        with pytest.raises(AccessDenied, match="not authorized"):
            client.call("Stage", path)                      # root too: polkit decides
        mock.allow("org.relaunchd.relaunch1.stage", "org.relaunchd.relaunch1.cancel")
        ident = client.call("Stage", path)
        assert wait_state(client, {"staged"}) == "staged"
        with pytest.raises(AccessDenied):
            client.call("Relaunch")
        with pytest.raises(AccessDenied):
            client.call("Inspect", path)
        r = relaunchctl(private_bus, "cancel", user="nobody")   # granted to everyone here
        assert r.returncode == 0, r.stderr
        mock.allow()
        r = relaunchctl(private_bus, "stage", path, user="nobody")
        assert r.returncode == 1 and "AccessDenied" in r.stderr
        assert client.get("State") == "idle" and ident
    finally:
        mock.stop()


# --- the process ------------------------------------------------------------------------

def test_sd_notify_watchdog_and_sigterm(private_bus, tmp_path, images):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    d = Daemon(private_bus, write_config(tmp_path, images),
               env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
    d.env["NOTIFY_SOCKET"] = sock_path   # PrivateBus.env drops the caller's; this is ours
    try:
        d.start()
        messages = [sock.recv(4096).decode() for _ in range(3)]
        assert any("READY=1" in m and "STATUS=idle" in m for m in messages)
        assert "WATCHDOG=1" in messages
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        rest = []
        sock.settimeout(0.5)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
        assert "stopping" in d.output()
    finally:
        d.stop()
        sock.close()


def test_version_and_check_config(tmp_path, images):
    exe = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "relaunchd"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("relaunchd ")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "support"))
    cfg = write_config(tmp_path, images)
    r = subprocess.run([*daemon_command("fake-engine"), "--config", str(cfg),
                        "--check-config"], env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "OK" in r.stdout


def test_busy_maps_to_class():
    assert isinstance(error_names.client_error(_remote("org.relaunchd.Relaunch1.Error.Busy")), Busy)
    unknown = _remote("org.freedesktop.DBus.Error.ServiceUnknown")
    assert isinstance(error_names.client_error(unknown), NoDaemon)


def _remote(name: str):
    from gi.repository import Gio, GLib

    return GLib.Error.new_literal(Gio.io_error_quark(), f"GDBus.Error:{name}: x", 0)
