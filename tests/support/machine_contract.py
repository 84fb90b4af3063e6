"""What the engine relies on from its machine (engine.machine.Machine), as assertions that
run unchanged against the in-memory FakeMachine and the real HostMachine
(tests/unit/engine/test_machine_contract.py, tests/integration/test_machine_contract.py).

Each function checks the shape and the rules the engine's code depends on, citing where:
a fake that returned something else would let an engine test pass against a machine that
does not exist.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from collections.abc import Sequence
from typing import Any

from relaunchd.engine import relaunch as engine_relaunch
from relaunchd.engine.machine import BootFacts
from relaunchd.formats import firmware_time
from relaunchd.launch import registry
from relaunchd.launch.assessment import Report
from relaunchd.launch.checks import Check, Verdict
from relaunchd.platform import quiesce
from relaunchd.platform.sysroot import Read
from relaunchd.platform.tpm_extend_log import ReplayResult

# Catalogue entries (engine.catalogue.list_images → ListImages; docs/dbus-api.md).
IMAGE_ENTRY_KEYS = {"path", "size", "mtime", "title", "uname", "signed", "profiles"}
# logind inhibitor entries (engine.relaunch names who blocks: "who (why, pid N)").
INHIBITOR_KEYS = {"what": str, "who": str, "why": str, "mode": str, "uid": int, "pid": int}
DIGEST_ITEMS = ("kernel", "initrd", "cmdline")
# The firmware time of the last cold boot (formats.firmware_time.FirmwareTime.to_json).
FIRMWARE_TIME_KEYS = {"source", "firmware_usec", "loader_usec", "avoided_usec", "reason"}
FIRMWARE_TIME_SOURCES = {firmware_time.SYSTEMD_BOOT, firmware_time.ACPI_FPDT,
                         firmware_time.UNKNOWN}


def _hex(value: Any, bank: str) -> bool:
    return (isinstance(value, str) and len(value) == 2 * hashlib.new(bank).digest_size
            and set(value) <= set(string.hexdigits.lower()))


def assert_readiness(report: Report) -> None:
    """engine.core.refresh_capabilities: a verdict for every method name, `best` the first
    ready one in registry order, `kexec.support` a readable dict with `kexec_core`."""
    assert isinstance(report, Report)
    assert set(report.verdicts) == set(registry.NAMES)
    for name, verdict in report.verdicts.items():
        assert isinstance(verdict, Verdict) and verdict.method == name
        assert verdict.checks and all(isinstance(c, Check) for c in verdict.checks)
        assert all(c.ok in (True, False, None) and c.id for c in verdict.checks)
        assert verdict.ready == all(c.ok is True for c in verdict.checks)
    ready = [m for m in registry.NAMES if report.verdicts[m].ready]
    assert report.best == (ready[0] if ready else None)
    support = report.facts["kexec.support"]
    assert isinstance(support, Read) and support.ok
    assert isinstance(support.value, dict) and support.value.get("kexec_core") in (True, False)
    assert all(isinstance(r, Read) for r in report.facts.values())
    json.dumps(report.to_json())                      # Check() returns it as it is


def assert_boot_id(value: str | None) -> None:
    """The pending record's boot_id, compared with the next boot's: a bare id or None."""
    assert value is None or (isinstance(value, str) and value and value == value.strip())


def assert_boot_facts(facts: BootFacts, *, drtm: bool) -> None:
    """engine.proof.evaluate reads every field; DRTM facts only for a DRTM method."""
    assert isinstance(facts, BootFacts)
    assert_boot_id(facts.boot_id)
    # /proc/cmdline as its one line reads (SysRoot.read_line): stripped, no newline
    assert facts.cmdline is None or (isinstance(facts.cmdline, str)
                                     and facts.cmdline == facts.cmdline.strip())
    assert facts.kernel_started is None or isinstance(facts.kernel_started, float)
    assert isinstance(facts.now, float) and abs(facts.now - time.time()) < 60
    assert isinstance(facts.slaunch, bool)
    assert isinstance(facts.drtm_pcrs, dict)
    if not drtm:
        assert facts.drtm_pcrs == {} and facts.drtm_log is None \
            and facts.drtm_log_error is None
        return
    # Either PCRs 17/18 as read, or why not.
    assert set(facts.drtm_pcrs) in ({"error"}, {"bank", "values", "reset_state"})
    # Exactly one of the log and the reason there is none.
    assert (facts.drtm_log is None) != (facts.drtm_log_error is None)
    assert facts.drtm_log is None or isinstance(facts.drtm_log, bytes)


def assert_firmware_time(value: dict[str, Any]) -> None:
    """engine.proof copies it into LastRelaunch.firmware_time (JSON, then a{sv}) and takes
    `avoided_usec` as what a relaunch avoided: a whole number of microseconds, the sum of
    the two figures, or None — then `source` is "unknown" and `reason` says why."""
    assert isinstance(value, dict) and set(value) == FIRMWARE_TIME_KEYS, value
    json.dumps(value)
    assert value["source"] in FIRMWARE_TIME_SOURCES, value
    if value["source"] == firmware_time.UNKNOWN:
        assert value["firmware_usec"] is None and value["loader_usec"] is None
        assert value["avoided_usec"] is None
        assert isinstance(value["reason"], str) and re.search(r"\S", value["reason"])
        return
    for key in ("firmware_usec", "loader_usec", "avoided_usec"):
        assert isinstance(value[key], int) and not isinstance(value[key], bool), value
        assert value[key] >= 0, value
    assert value["avoided_usec"] == value["firmware_usec"] + value["loader_usec"]
    assert value["reason"] is None or isinstance(value["reason"], str)


def assert_found_images(found: list[str], expected: Sequence[str]) -> None:
    """`*.efi` regular files (any case), not symlinks, each real file once, directory
    order then name order (what ListImages shows)."""
    assert found == list(expected)


def assert_image_entry(entry: dict, path: str, *, error: str | None = None) -> None:
    """One ListImages entry: every key on a readable image, `error` (and no title) on one
    that cannot be read or that the policy refuses."""
    assert entry["path"] == path
    json.dumps(entry)
    if error is None:
        assert set(entry) == IMAGE_ENTRY_KEYS, entry
        assert isinstance(entry["size"], int) and isinstance(entry["mtime"], int)
        assert isinstance(entry["signed"], bool) and isinstance(entry["profiles"], int)
    else:
        assert error in entry["error"], entry
        assert set(entry) <= IMAGE_ENTRY_KEYS | {"error"}


def assert_inhibitor_entries(entries: list[dict], expected_who: list[str]) -> None:
    assert [e["who"] for e in entries] == expected_who
    for entry in entries:
        assert set(entry) == set(INHIBITOR_KEYS)
        assert all(isinstance(entry[k], t) for k, t in INHIBITOR_KEYS.items())
        # only block locks on shutdown make a relaunch wait (platform.inhibitors)
        assert entry["mode"] == "block" and "shutdown" in entry["what"].split(":")


# platform.sealed_volumes.report's entries (docs/fleet.md "Sealed volumes").
VOLUME_KEYS = {"name", "device", "pcrs", "unlocks_after_relaunch", "stale_pcrs", "reason",
               "remedy"}


def assert_volume_entries(volumes: list[dict], expected_names: list[str | None]) -> None:
    assert [v["name"] for v in volumes] == expected_names
    for volume in volumes:
        assert set(volume) >= VOLUME_KEYS, volume
        assert isinstance(volume["unlocks_after_relaunch"], bool)
        assert all(isinstance(p, int) for p in volume["pcrs"] + volume["stale_pcrs"])
        assert isinstance(volume["reason"], str) and volume["reason"]
        if "error" in volume:        # cannot tell: never counted as unlocking
            assert volume["unlocks_after_relaunch"] is False


def assert_quiesce_plan(plan: quiesce.QuiescePlan) -> None:
    """engine.stage stores it (to_json) for the shutdown hook, which reads it back
    (from_json); plan_summary goes into staged.json."""
    assert isinstance(plan, quiesce.QuiescePlan)
    assert quiesce.QuiescePlan.from_json(plan.to_json()) == plan
    assert plan.reboot_cpu not in plan.offline_cpus
    assert list(plan.offline_cpus) == sorted(set(plan.offline_cpus))
    json.dumps(engine_relaunch.plan_summary(plan))


def assert_rehearsal(report: quiesce.RehearsalReport) -> None:
    assert isinstance(report, quiesce.RehearsalReport)
    result = engine_relaunch.rehearsal_json(report)
    json.dumps(result)
    assert result["ok"] is True


def assert_digests(digests: dict, banks: Sequence[str], *, initrd: bool) -> None:
    """engine.stage records them and engine.relaunch extends them (bytes.fromhex)."""
    assert list(digests) == [i for i in DIGEST_ITEMS if initrd or i != "initrd"]
    for item, per_bank in digests.items():
        assert list(per_bank) == list(banks), item
        assert all(_hex(per_bank[b], b) for b in banks), (item, per_bank)


def assert_replay(result: ReplayResult, banks: Sequence[str]) -> None:
    """engine.proof: ok, per-bank expected/actual hex values, and why not."""
    assert isinstance(result, ReplayResult)
    assert isinstance(result.ok, bool)
    assert result.ok == (not result.mismatches)
    for values in (result.expected, result.actual):
        assert set(values) <= set(banks)
        assert all(_hex(v, b) for b, v in values.items()), values
    if result.ok:
        assert set(result.expected) == set(banks) and result.expected == result.actual
    assert all(isinstance(m, str) and re.search(r"\S", m) for m in result.mismatches)
