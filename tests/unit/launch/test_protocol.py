"""The one interface of a launch method (relaunchd.launch.protocol): every registered method
provides it, and a LaunchRequest is a frozen record of where to look."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from relaunchd.launch import registry
from relaunchd.launch.protocol import LaunchMethod, LaunchRequest
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot

MEMBERS = {"verdict", "segment_inputs"}


def test_the_protocol_declares_what_the_engine_and_staging_use():
    declared = {n for n, _ in inspect.getmembers(LaunchMethod) if not n.startswith("_")}
    assert declared >= MEMBERS
    assert {"name", "drtm", "default_loader"} <= set(LaunchMethod.__annotations__)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_method_provides_it(name):
    method = registry.method(name)
    parameters = {member: list(inspect.signature(getattr(method, member)).parameters)
                  for member in MEMBERS}
    assert parameters == {"verdict": ["facts"], "segment_inputs": ["request"]}
    assert isinstance(method.name, str) and isinstance(method.drtm, bool)
    assert method.default_loader in ("file", "segments")


def test_a_request_is_frozen_and_names_no_files_by_default(tmp_path):
    request = LaunchRequest(SysRoot(str(tmp_path)), ProbeConfig(root=str(tmp_path)))
    assert request.sinit_acm is None and request.dl_handler is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.sinit_acm = "/boot/x"   # type: ignore[misc]
