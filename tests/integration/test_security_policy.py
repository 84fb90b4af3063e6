"""Every method of org.relaunchd.Relaunch1.Manager, walked from the shipped introspection
XML and called as `nobody` through the shipped bus policy (issue #14, item 4).

The bus policy only decides which messages are delivered; polkit decides who may act. So
for a non-root caller every method must reach relaunchd: the privileged ones (annotated
`org.freedesktop.systemd1.Privileged`) are refused by polkit — relaunchd's own
"<action>: not authorized", never dbus-daemon's "Rejected send message" — and the open
ones are answered. With polkit allowing everything, no call is refused at all.

The daemon runs the real engine over the side-effect-free machine
(tests/support/dbus_fake_machine.py) and a python-dbusmock polkitd."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import yaml

from relaunchd.bus import names
from support.dbus_harness import Daemon, PolkitMock, PrivateBus

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runuser, bus policy)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"
PRIVILEGED = "org.freedesktop.systemd1.Privileged"
POLKIT_DENIAL = "not authorized"
BUS_POLICY_DENIAL = "Rejected send message"


@dataclass(frozen=True)
class Method:
    name: str
    in_signatures: tuple[str, ...]
    privileged: bool


def shipped_methods() -> list[Method]:
    xml = (resources.files("relaunchd.bus") / names.INTROSPECTION_XML).read_text()
    iface = ET.fromstring(xml).find(f"interface[@name='{names.INTERFACE}']")
    methods = []
    for m in iface.findall("method"):
        ins = tuple(a.get("type") for a in m.findall("arg") if a.get("direction", "in") == "in")
        privileged = any(a.get("name") == PRIVILEGED and a.get("value") == "true"
                         for a in m.findall("annotation"))
        methods.append(Method(m.get("name"), ins, privileged))
    return methods


def gvariant_args(method: Method, path: str) -> list[str]:
    """gdbus call arguments for `method`: the image path for every string, no options."""
    text = {"s": repr(path), "a{sv}": "@a{sv} {}"}
    unknown = [s for s in method.in_signatures if s not in text]
    assert not unknown, f"{method.name}: teach this test argument type(s) {unknown}"
    return [text[s] for s in method.in_signatures]


def call_as(bus: PrivateBus, user: str, method: Method, path: str) -> subprocess.CompletedProcess:
    cmd = ["runuser", "-u", user, "--", "gdbus", "call", "--system", "-d", names.BUS_NAME,
           "-o", names.OBJECT_PATH, "-m", f"{names.INTERFACE}.{method.name}",
           *gvariant_args(method, path)]
    return subprocess.run(cmd, env=bus.env(), capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def bus():
    b = PrivateBus().start()
    yield b
    b.stop()


@pytest.fixture
def daemon(bus, tmp_path):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "vm-no-tpm" / "root", root, symlinks=True)
    for d in ("state", "run"):
        (tmp_path / d).mkdir()
    config = tmp_path / "relaunchd.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(root), "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(images)],
        "launch": {"method": "kexec"}}))
    d = Daemon(bus, config, engine="fake-machine").start()
    yield {"daemon": d, "image": str(images / "missing.efi")}
    d.stop()


@pytest.fixture
def polkit(bus):
    mock = PolkitMock(bus).start()
    yield mock
    mock.stop()


def test_the_xml_has_privileged_and_open_methods():
    methods = {m.name: m for m in shipped_methods()}
    # The walk below is only as good as the XML: the mutating methods must be marked.
    for name in ("Stage", "Relaunch", "Rehearse", "Cancel", "Inspect"):
        assert methods[name].privileged, name
    for name in ("Check", "ListImages", "GetHistory"):
        assert not methods[name].privileged, name


def test_every_method_reaches_polkit_for_nobody(bus, daemon, polkit):
    polkit.allow()                          # polkit says no to everything
    refused_by_bus, wrong = [], []
    for method in shipped_methods():
        out = call_as(bus, "nobody", method, daemon["image"])
        if BUS_POLICY_DENIAL in out.stderr:
            refused_by_bus.append(method.name)
        elif method.privileged:
            if not (out.returncode != 0 and names.ACCESS_DENIED in out.stderr
                    and names.ACTION_PREFIX in out.stderr and POLKIT_DENIAL in out.stderr):
                wrong.append((method.name, out.returncode, out.stderr.strip()))
        elif out.returncode != 0:
            wrong.append((method.name, out.returncode, out.stderr.strip()))
    assert not refused_by_bus, f"the bus policy rejects {refused_by_bus} before polkit"
    assert not wrong, wrong


def test_polkit_alone_decides(bus, daemon, polkit):
    """polkit allowing every action: nobody's calls all reach the engine (its answers are
    its own: nothing is staged, the image does not exist — never AccessDenied)."""
    methods = shipped_methods()
    polkit.allow(*sorted({names.ACTION_PREFIX + a for a in
                          ("stage", "relaunch", "cancel", "inspect")}))
    for method in methods:
        out = call_as(bus, "nobody", method, daemon["image"])
        assert "AccessDenied" not in out.stderr, (method.name, out.stderr)
        assert out.returncode == 0 or names.ERROR_PREFIX in out.stderr, (method.name,
                                                                         out.stderr)
