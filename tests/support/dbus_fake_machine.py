"""The real `HostMachine` with every host-changing step faked, for tests that run the real
engine over real staging: the bus tests (`daemon_under_test.py fake-machine`) and
tests/integration/test_engine_real.py.

Real: verification and staging (`staging.prepare`: sealed memfds, signatures, the kernel,
initrd and command line), the image catalogue, readiness (read under the configured root,
a fixture tree), the quiesce plan (read-only), boot id and boot facts (read under the
root), and the measurement (no TPM on a development host: unmeasured). Faked: the kexec
load is a flag file, unload clears it, quiesce and its rehearsal and rollback only return
empty reports, and the hand-off appends its kind to a file. Nothing here can load a
kernel, offline a CPU, unbind a driver, reboot or start kexec.target on the host.

The flag and hand-off files live in the runtime directory, so a daemon restarted in the
same test finds what the one before it loaded (as the kernel would keep it).

Environment, for the daemon process (`from_config`): FAKE_LOAD_DELAY (s, default 0) slows
the load so a test can kill the daemon mid-staging; FAKE_LOAD_FAILS_FOR=TEXT makes the load
of an image whose path contains TEXT fail as the kernel's would (nothing changes: what was
loaded stays); FAKE_HANDOFF_STOPS_US=1 makes the hand-off SIGTERM the daemon before it
returns, as the real shutdown does.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.machine import Progress
from relaunchd.errors import KexecFailed
from relaunchd.platform import quiesce, sealed_memfd
from relaunchd.platform.probe_config import ProbeConfig
from relaunchd.platform.sysroot import SysRoot

ProgressHook = Callable[[Progress], Progress]


class HostMachineWithoutSideEffects(HostMachine):
    def __init__(self, root: str, runtime_dir: str, *, probe_config: ProbeConfig | None = None,
                 load_delay: float = 0.0, handoff_stops_us: bool = False,
                 load_fails_for: str | None = None) -> None:
        super().__init__(SysRoot(root), probe_config or ProbeConfig(root=root))
        self.flag = Path(runtime_dir) / "fake-kexec-loaded"
        self.handoffs = Path(runtime_dir) / "fake-handoffs"
        self.load_delay = load_delay
        self.handoff_stops_us = handoff_stops_us
        self.load_fails_for = load_fails_for
        self.loads: list = []                  # the staged images load() was given, in order
        # Wraps staging's progress callback (a test's pause point inside real staging).
        self.progress_hook: ProgressHook | None = None

    @classmethod
    def from_config(cls, config) -> HostMachineWithoutSideEffects:
        """As the daemon builds its machine (HostMachine.for_config), with the switches
        from the environment."""
        return cls(config.root, config.runtime_dir, probe_config=config.probe_config(),
                   load_delay=float(os.environ.get("FAKE_LOAD_DELAY", "0")),
                   handoff_stops_us=bool(os.environ.get("FAKE_HANDOFF_STOPS_US")),
                   load_fails_for=os.environ.get("FAKE_LOAD_FAILS_FOR") or None)

    def kexec_loaded(self) -> bool | None:
        return self.flag.exists() and self.flag.read_text() == "1"

    def prepare(self, path, options, progress=None):
        if self.progress_hook is not None and progress is not None:
            progress = self.progress_hook(progress)
        return super().prepare(path, options, progress)

    def load(self, staged) -> None:
        # What the kernel would be handed: sealed memfds, still open.
        assert sealed_memfd.is_sealed(staged.kernel.fd), "load() of an unsealed kernel"
        time.sleep(self.load_delay)
        if self.load_fails_for and self.load_fails_for in staged.source:
            raise KexecFailed("kexec_file_load failed: Cannot allocate memory (fake)")
        self.loads.append(staged)
        self.flag.write_text("1")

    def unload(self) -> None:
        self.flag.write_text("0")

    def handoff(self, kind: str) -> None:
        with open(self.handoffs, "a") as f:
            f.write(kind + "\n")
        if self.handoff_stops_us:
            # As systemd does once kexec.target is queued: SIGTERM to the service while
            # the hand-off call is still returning.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    def handoff_kinds(self) -> list[str]:
        """The hand-offs asked for so far, oldest first."""
        return self.handoffs.read_text().split() if self.handoffs.exists() else []

    def quiesce(self, plan, journal):
        return quiesce.ExecuteReport()

    def rehearse(self, plan, journal):
        return quiesce.RehearsalReport([], True, True, [], quiesce.RollbackReport())

    def rollback(self, journal):
        return quiesce.RollbackReport()
