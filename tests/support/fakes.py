"""Fakes shared by the tests: the engine's machine in memory (`FakeMachine`), and what
it stages (`FakeStaged`). The D-Bus tests' fakes are in dbus_fake_engine.py (an engine)
and dbus_fake_machine.py (the real machine with every host-changing step faked)."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.machine import BootFacts
from relaunchd.formats.boot_entries import LoaderSettings
from relaunchd.launch.assessment import Report
from relaunchd.launch.checks import Check, Verdict
from relaunchd.launch.registry import NAMES
from relaunchd.platform import image_files, quiesce
from relaunchd.platform.boot_entries import Listing
from relaunchd.platform.boot_partition import Partitions
from relaunchd.platform.sysroot import Read, SysRoot
from relaunchd.platform.tpm_extend_log import ReplayResult
from relaunchd.platform.trust_store import load_certificates

BOOT_ID = "0f6e4d1c-0000-4000-8000-000000000001"


@dataclass
class FakeBlob:
    sha256: str


@dataclass
class FakeCmdline:
    text: str


@dataclass
class FakeStaged:
    """What staging.prepare returns, as far as the engine looks."""

    id: str
    source: str
    method: str
    loader: str
    kernel: FakeBlob = field(default_factory=lambda: FakeBlob("11" * 32))
    initrd: FakeBlob | None = field(default_factory=lambda: FakeBlob("22" * 32))
    cmdline: FakeCmdline = field(default_factory=lambda: FakeCmdline("console=ttyS0"))
    closed: int = 0

    def plan(self) -> dict:
        return {"pcr11": {"sha256": "33" * 32}, "pcr11_phases": {"enter-initrd": {}}}

    def close(self) -> None:
        self.closed += 1


def make_report(ready: set[str] = frozenset({"kexec"}), kexec_core: bool = True) -> Report:
    verdicts = {m: Verdict(m, (Check(f"{m}-ok", True, "fine"),) if m in ready
                           else (Check(f"{m}-missing", False, "not here"),))
                for m in NAMES}
    facts = {"kexec.support": Read("/sys/kernel/kexec_loaded",
                                   {"kexec_core": kexec_core, "kexec_file_load": True})}
    return Report("/", facts, verdicts)


class FakeMachine:
    """The engine's `Machine` in memory: every step recorded in `calls`, each failure
    switchable, staging returning `FakeStaged`. Steps without side effects on the host
    (certificate files, the image location rules, the image catalogue) are the real ones.
    tests/unit/engine/test_machine_contract.py holds it to the real `HostMachine`."""

    def __init__(self, loaded: bool | None = False, report: Report | None = None) -> None:
        self.loaded = loaded
        self.report = report or make_report()
        self.calls: list[tuple] = []
        self.staged: list[FakeStaged] = []
        self.options: list[Any] = []
        self.fail_prepare: BaseException | None = None
        self.fail_load: BaseException | None = None
        self.fail_unload: BaseException | None = None
        self.fail_handoff: BaseException | None = None
        self.load_leaves_unloaded = False
        self.progress_calls = 0
        self.progress_delay = 0.0
        self.in_prepare = threading.Event()
        self.release_prepare = threading.Event()
        self.release_prepare.set()
        self.in_load = threading.Event()
        self.release_load = threading.Event()
        self.release_load.set()
        self.inhibitors: list[dict] = []
        self.tpm = True                       # False: measure raises NoTpm
        self.fail_measure: BaseException | None = None
        self.fail_quiesce: BaseException | None = None
        self.reset_count = 7
        self.verdict = ReplayResult(True, {"sha256": "aa"}, {"sha256": "aa"}, ())
        self.facts = BootFacts(boot_id="new-boot", cmdline="console=ttyS0\n",
                               kernel_started=None, now=time.time(), slaunch=False,
                               drtm_pcrs={})
        self.measured_items: list = []
        self.dropped = 0
        self.boot: str | None = BOOT_ID
        self.boot_root: str | None = None     # where boot_entries reads (a fixture tree)
        self.entry_options: list[dict] = []   # prepare_entry's keyword arguments

    # The catalogue, trust and location rules read files only: the real ones.
    def find_images(self, directories):
        return HostMachine().find_images(directories)

    def describe_image(self, path, policy):
        return HostMachine().describe_image(path, policy)

    def inspect_image(self, path, *, profile, banks, trusted):
        return HostMachine().inspect_image(path, profile=profile, banks=banks, trusted=trusted)

    def trusted_certificates(self, paths):
        return load_certificates(paths)

    def check_location(self, path, policy):
        image_files.check_location(path, policy)

    # The boot entries are read from files (`boot_root`): the real listing. Without a
    # boot_root the machine has no boot partitions (never the host's own).
    def boot_entries(self, *, esp, xbootldr, trusted):
        if self.boot_root is None:
            return Listing(Partitions(None, None, ("FakeMachine: no boot_root",)), [],
                           LoaderSettings())
        return HostMachine(SysRoot(self.boot_root)).boot_entries(esp=esp, xbootldr=xbootldr,
                                                                  trusted=trusted)

    def prepare_entry(self, listed, options, *, allow_unsigned_parts, progress=None):
        """As `prepare`, for an entry: the staged command line is the entry's options
        plus what staging adds, so the engine's record can be checked against it."""
        self.calls.append(("prepare_entry", listed.id))
        self.entry_options.append({"allow_unsigned_parts": allow_unsigned_parts})
        staged = self._prepared(listed.path(listed.entry.source), options, progress)
        args = [*options.append, f"relaunchd.id={options.relaunch_id}"]
        staged.cmdline = FakeCmdline(" ".join([listed.entry.options or "", *args]).strip())
        return staged

    def kexec_loaded(self) -> bool | None:
        return self.loaded

    def prepare(self, path, options, progress=None):
        self.calls.append(("prepare", path))
        return self._prepared(path, options, progress)

    def _prepared(self, path, options, progress):
        self.options.append(options)
        self.in_prepare.set()
        for i in range(self.progress_calls):
            progress("verifying", i + 1, self.progress_calls)
            if self.progress_delay:
                time.sleep(self.progress_delay)
        while not self.release_prepare.wait(0.005):
            progress("verifying", 1, 2)          # the engine's chance to cancel
        if self.fail_prepare is not None:
            raise self.fail_prepare
        staged = FakeStaged(options.relaunch_id, path, options.method,
                            options.effective_loader)
        self.staged.append(staged)
        return staged

    def load(self, staged) -> None:
        self.calls.append(("load", staged.id))
        self.in_load.set()
        self.release_load.wait(10)
        if self.fail_load is not None:
            raise self.fail_load
        self.loaded = not self.load_leaves_unloaded

    def unload(self) -> None:
        self.calls.append(("unload",))
        if self.fail_unload is not None:
            raise self.fail_unload
        self.loaded = False

    def handoff(self, kind: str) -> None:
        self.calls.append(("handoff", kind))
        if self.fail_handoff is not None:
            raise self.fail_handoff

    def readiness(self) -> Report:
        return self.report

    def boot_id(self) -> str | None:
        return self.boot

    def digests(self, staged, banks):
        return {item: {b: f"{n:02x}" * 32 for b in banks}
                for n, item in enumerate(("kernel", "initrd", "cmdline"), 1)}

    def quiesce_plan(self, policy):
        return quiesce.QuiescePlan(reboot_cpu=0, offline_cpus=(1,), kept_cpus=(), devices=(),
                                   holders=())

    def quiesce(self, plan, journal):
        self.calls.append(("quiesce", plan.offline_cpus))
        if self.fail_quiesce is not None:
            raise self.fail_quiesce
        return quiesce.ExecuteReport()

    def rehearse(self, plan, journal):
        self.calls.append(("rehearse", plan.offline_cpus))
        if self.fail_quiesce is not None:
            raise self.fail_quiesce
        entry = quiesce.JournalEntry(quiesce.CPU_OFFLINE, "1", "1")
        return quiesce.RehearsalReport([entry], True, True, [],
                                       quiesce.RollbackReport(restored=["CPU 1 online"]))

    def rollback(self, journal):
        self.calls.append(("rollback",))
        return quiesce.RollbackReport()

    def block_inhibitors(self):
        return list(self.inhibitors)

    def measure(self, tcti, pcr, banks, items, log_path, relaunch_id):
        from relaunchd.errors import NoTpm

        self.calls.append(("measure", pcr))
        if not self.tpm:
            raise NoTpm("no TPM: cannot open device:/dev/tpmrm0")
        if self.fail_measure is not None:
            raise self.fail_measure
        self.measured_items = list(items)
        return self.reset_count

    def replay_log(self, log_path, tcti, pcr, banks):
        return self.verdict

    def tpm_reset_count(self, tcti):
        return self.reset_count

    def recover_log(self, log_path, tcti, pcr, banks):
        self.calls.append(("recover",))
        return self.dropped

    def boot_facts(self, drtm, tcti):
        return dataclasses.replace(self.facts, now=time.time())

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]
