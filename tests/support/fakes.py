"""Fakes shared by the tests: the engine's machine in memory (`FakeMachine`), and what
it stages (`FakeStaged`). The other fakes are dbus_fake_engine.py (an engine for the bus
tests) and dbus_fake_machine.py (the real HostMachine with every host-changing step
faked, for the real engine over real staging).

Each is held to the real thing by contract tests that run the same assertions against
both: tests/unit/engine/test_machine_contract.py and
tests/integration/test_machine_contract.py (FakeMachine vs HostMachine, assertions in
support/machine_contract.py), tests/integration/test_engine_contract.py (the fake engine vs
engine.core.Engine)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.machine import BootFacts
from relaunchd.errors import NoTpm
from relaunchd.formats.boot_entries import LoaderSettings
from relaunchd.formats.firmware_time import UNKNOWN, FirmwareTime
from relaunchd.launch.assessment import Report
from relaunchd.launch.checks import Check, Verdict
from relaunchd.launch.registry import NAMES
from relaunchd.platform import image_files, quiesce
from relaunchd.platform.boot_entries import Listing
from relaunchd.platform.boot_partition import Partitions
from relaunchd.platform.inhibitors import Inhibitor
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
    (certificate files, the image location rules, the image catalogue, which logind locks
    block) are the real ones. tests/unit/engine/test_machine_contract.py and
    tests/integration/test_machine_contract.py hold it to the real `HostMachine`.

    By design it does not model: what staging builds (every FakeStaged has the same
    kernel/initrd digests and the command line `console=ttyS0`, whatever the options),
    a TPM (the replay verdict and reset counter are what a test sets), a kernel (load
    sets `loaded`), or firmware (the last cold boot's firmware time is `cold_boot`, what
    a test sets; a firmware reboot does not change it)."""

    def __init__(self, loaded: bool | None = False, report: Report | None = None) -> None:
        self.loaded = loaded
        self.report = report or make_report()
        self.calls: list[tuple] = []
        self.staged: list[FakeStaged] = []
        self.options: list[Any] = []
        self.fail_prepare: BaseException | None = None
        self.fail_load: BaseException | None = None
        # Per image (by path): replacing a staged image fails for the new one only.
        self.fail_prepare_for: dict[str, BaseException] = {}
        self.fail_load_for: dict[str, BaseException] = {}
        self.unloaded_after_load_for: set[str] = set()
        self.fail_digests: BaseException | None = None
        self.fail_quiesce_plan: BaseException | None = None
        self.loaded_source: str | None = None     # the path of the image loaded now
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
        self.inhibitors: list[Inhibitor] = []     # what logind would list
        self.volumes: list[dict] = []         # what platform.sealed_volumes would report
        self.tpm = True                       # False: every TPM step raises NoTpm
        self.fail_measure: BaseException | None = None
        self.fail_quiesce: BaseException | None = None
        self.reset_count = 7
        self.verdict: ReplayResult | None = None    # None: the log replays
        self.facts = BootFacts(boot_id="new-boot", cmdline="console=ttyS0",
                               kernel_started=None, now=time.time(), slaunch=False,
                               drtm_pcrs={})
        self.measured_items: list = []
        self.dropped = 0
        self.boot: str | None = BOOT_ID
        self.boot_root: str | None = None     # where boot_entries reads (a fixture tree)
        self.entry_options: list[dict] = []   # prepare_entry's keyword arguments
        # What firmware_time() answers (the FirmwareTime HostMachine would read; default
        # unknown, as a BIOS boot). fail_firmware_time: the read fails, which — as on
        # HostMachine — is an unknown figure with the reason, never an exception.
        self.cold_boot = FirmwareTime(UNKNOWN, reason="FakeMachine: no boot loader "
                                      "timestamps and no ACPI FPDT boot record")
        self.fail_firmware_time: BaseException | None = None

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
        if path in self.fail_prepare_for:
            raise self.fail_prepare_for[path]
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
        if staged.source in self.fail_load_for:
            raise self.fail_load_for[staged.source]
        # As the kernel: a load that fails changes nothing; one that succeeds replaces
        # whatever was loaded (kernel/kexec_file.c: xchg(dest_image, image) at the end).
        self.loaded = not (self.load_leaves_unloaded
                           or staged.source in self.unloaded_after_load_for)
        self.loaded_source = staged.source if self.loaded else None

    def unload(self) -> None:
        self.calls.append(("unload",))
        if self.fail_unload is not None:
            raise self.fail_unload
        self.loaded = False
        self.loaded_source = None

    def handoff(self, kind: str) -> None:
        self.calls.append(("handoff", kind))
        if self.fail_handoff is not None:
            raise self.fail_handoff

    def readiness(self) -> Report:
        return self.report

    def sealed_volumes(self, method, tcti, measurement_pcr):
        return [dict(v) for v in self.volumes]

    def boot_id(self) -> str | None:
        return self.boot

    def digests(self, staged, banks):
        """Made-up values (01…, 02…, 03…) of each bank's length; no initrd digest for an
        image without one, as HostMachine."""
        if self.fail_digests is not None:
            raise self.fail_digests
        items = [("kernel", 1), ("initrd", 2), ("cmdline", 3)]
        return {item: {b: f"{n:02x}" * hashlib.new(b).digest_size for b in banks}
                for item, n in items if item != "initrd" or staged.initrd is not None}

    def quiesce_plan(self, policy):
        if self.fail_quiesce_plan is not None:
            raise self.fail_quiesce_plan
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
        # The rule of which locks block and the entries' shape are HostMachine's; only
        # logind's answer (`inhibitors`, Inhibitor records) is made up.
        return HostMachine(inhibitor_source=self).block_inhibitors()

    def list_inhibitors(self) -> list[Inhibitor]:
        """The InhibitorSource (bus.logind's part) block_inhibitors asks."""
        return list(self.inhibitors)

    def _require_tpm(self) -> None:
        # As HostMachine without a TPM (tpm_extend_log: no device, no tpm2-pytss).
        if not self.tpm:
            raise NoTpm("no TPM: cannot open device:/dev/tpmrm0")

    def measure(self, tcti, pcr, banks, items, log_path, relaunch_id):
        self.calls.append(("measure", pcr))
        self._require_tpm()
        if self.fail_measure is not None:
            raise self.fail_measure
        self.measured_items = list(items)
        return self.reset_count

    def replay_log(self, log_path, tcti, pcr, banks):
        self._require_tpm()
        if self.verdict is None:     # the log replays: every bank asked for, PCR and log agree
            zeros = {b: "00" * hashlib.new(b).digest_size for b in banks}
            return ReplayResult(True, zeros, dict(zeros), ())
        return self.verdict

    def tpm_reset_count(self, tcti):
        self._require_tpm()
        return self.reset_count

    def recover_log(self, log_path, tcti, pcr, banks):
        self.calls.append(("recover",))
        self._require_tpm()
        return self.dropped

    def boot_facts(self, drtm, tcti):
        facts = dataclasses.replace(self.facts, now=time.time())
        if drtm and not facts.drtm_pcrs:
            # As HostMachine on a machine without Secure Launch: no DRTM PCRs to read,
            # no securityfs log (unless a test set them).
            facts = dataclasses.replace(facts, drtm_pcrs={"error": "no TPM"})
        if drtm and facts.drtm_log is None and facts.drtm_log_error is None:
            facts = dataclasses.replace(
                facts, drtm_log_error="/sys/kernel/security/slaunch/eventlog: not-present")
        return facts

    def firmware_time(self) -> dict:
        if self.fail_firmware_time is not None:
            # As HostMachine: a read that fails is an unknown figure, never an exception.
            return FirmwareTime(UNKNOWN, reason="cannot read the firmware time: "
                                f"{self.fail_firmware_time}").to_json()
        return self.cold_boot.to_json()

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]
