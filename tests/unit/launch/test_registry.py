"""The launch methods by name (relaunchd.launch.registry): one list, strongest first, each
name resolving to the module that implements it, and the DRTM ones loaded only when asked
for (staging a plain kexec must not pay for the TXT/ACM/SLRT decoders)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.launch import names, registry
from relaunchd.launch.kexec import KexecMethod
from relaunchd.launch.skinit import SkinitMethod
from relaunchd.launch.txt import TxtMethod


def test_one_list_strongest_first():
    assert registry.NAMES == names.NAMES == ("txt", "skinit", "kexec")
    assert registry.DRTM_NAMES == ("txt", "skinit")


@pytest.mark.parametrize(("name", "cls", "drtm", "loader"), [
    ("txt", TxtMethod, True, "segments"),       # a DRTM launch needs kexec_load's segments
    ("skinit", SkinitMethod, True, "segments"),
    ("kexec", KexecMethod, False, "file"),
])
def test_each_name_is_its_module(name, cls, drtm, loader):
    method = registry.method(name)
    assert isinstance(method, cls)
    assert (method.name, method.drtm, method.default_loader) == (name, drtm, loader)
    assert registry.is_drtm(name) is drtm


def test_methods_in_order():
    assert [m.name for m in registry.methods()] == list(registry.NAMES)


@pytest.mark.parametrize("name", ["auto", "grub", "", "TXT"])
def test_an_unknown_name_is_refused_naming_the_known_ones(name):
    with pytest.raises(InvalidArgument, match="txt, skinit, kexec"):
        registry.method(name)


def test_the_drtm_methods_are_imported_only_when_asked_for():
    code = ("import sys\n"
            "from relaunchd.launch import registry\n"
            "registry.method('kexec')\n"
            "loaded = lambda: sorted(m for m in sys.modules if m in ("
            "'relaunchd.launch.txt', 'relaunchd.launch.skinit', 'relaunchd.formats.acm', "
            "'relaunchd.formats.slrt'))\n"
            "print(loaded())\n"
            "registry.method('txt')\n"
            "print(loaded())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert "relaunchd.launch.txt" in out[1] and "relaunchd.formats.acm" in out[1]
