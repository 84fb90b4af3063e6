"""The engine's view of the machine (relaunchd.engine.machine): every method the `Machine`
protocol declares is provided — with the same parameters — by the real HostMachine and by
the in-memory FakeMachine (what each returns is held equal by test_machine_contract.py)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.machine import BootFacts, Machine
from support.fakes import FakeMachine

METHODS = sorted(name for name, member in inspect.getmembers(Machine, inspect.isfunction)
                 if not name.startswith("_"))


def test_the_protocol_names_every_step_the_engine_takes():
    assert sorted([
        "find_images", "describe_image", "inspect_image", "trusted_certificates",
        "check_location", "kexec_loaded", "prepare", "load", "unload", "digests",
        "readiness", "block_inhibitors", "quiesce_plan", "quiesce", "rehearse", "rollback",
        "measure", "replay_log", "tpm_reset_count", "recover_log", "handoff", "boot_id",
        "boot_facts", "boot_entries", "prepare_entry", "sealed_volumes",
        "firmware_time"]) == METHODS


@pytest.mark.parametrize("cls", [HostMachine, FakeMachine], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", METHODS)
def test_each_machine_provides_each_step_with_the_same_parameters(cls, name):
    declared = list(inspect.signature(getattr(Machine, name)).parameters)
    provided = list(inspect.signature(getattr(cls, name)).parameters)
    assert provided == declared


def test_boot_facts_are_a_frozen_record():
    facts = BootFacts(boot_id="b", cmdline="c", kernel_started=None, now=1.0, slaunch=False,
                      drtm_pcrs={})
    assert facts.drtm_log is None and facts.drtm_log_error is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.boot_id = "other"   # type: ignore[misc]
