"""A test-only machine for the bus tests with the real engine
(`daemon_under_test.py fake-machine`). Verification is real (`staging.prepare`), and so
are the quiesce plan (read-only) and the measurement (no TPM on a development host:
unmeasured); the kexec load is a file, quiesce and its rehearsal only record the plan, and
the hand-off only writes a marker: nothing here can load a kernel, offline a CPU, reboot or
start kexec.target on the host.

Environment: FAKE_LOAD_DELAY (s, default 0) slows the load so a test can kill the
daemon mid-staging; FAKE_LOAD_FAILS_FOR=TEXT makes the load of an image whose path contains
TEXT fail as the kernel's would (nothing changes: what was loaded stays);
FAKE_HANDOFF_STOPS_US=1 makes the hand-off SIGTERM the daemon before
it returns, as the real shutdown does.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from relaunchd.engine.host_machine import HostMachine
from relaunchd.errors import KexecFailed
from relaunchd.platform import quiesce


class HostMachineWithoutSideEffects(HostMachine):
    def __init__(self, config) -> None:
        base = HostMachine.for_config(config)
        super().__init__(base.root, base.probe_config)
        self.flag = Path(config.runtime_dir) / "fake-kexec-loaded"
        self.handoffs = Path(config.runtime_dir) / "fake-handoffs"

    def kexec_loaded(self) -> bool | None:
        return self.flag.exists() and self.flag.read_text() == "1"

    def load(self, staged) -> None:
        time.sleep(float(os.environ.get("FAKE_LOAD_DELAY", "0")))
        fails_for = os.environ.get("FAKE_LOAD_FAILS_FOR")
        if fails_for and fails_for in staged.source:
            raise KexecFailed("kexec_file_load failed: Cannot allocate memory (fake)")
        self.flag.write_text("1")

    def unload(self) -> None:
        self.flag.write_text("0")

    def handoff(self, kind: str) -> None:
        with open(self.handoffs, "a") as f:
            f.write(kind + "\n")
        if os.environ.get("FAKE_HANDOFF_STOPS_US"):
            # As systemd does once kexec.target is queued: SIGTERM to the service while
            # the hand-off call is still returning.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    def quiesce(self, plan, journal):
        return quiesce.ExecuteReport()

    def rehearse(self, plan, journal):
        return quiesce.RehearsalReport([], True, True, [], quiesce.RollbackReport())

    def rollback(self, journal):
        return quiesce.RollbackReport()
