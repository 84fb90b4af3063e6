"""A private software TPM (swtpm) on loopback for tests, always cleaned up.

Recipe: docs/research/ecosystem.md §6.3 — `--flags not-need-init,startup-clear`
(without them the TPM is in failure mode), an absolute state directory (swtpm
chdirs away), TCP on 127.0.0.1 only, killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Swtpm:
    port: int
    ctrl_port: int
    state_dir: str
    pid: int

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-tss / tpm2-pytss / systemd's --tpm2-device."""
        return f"swtpm:host=127.0.0.1,port={self.port}"


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and _is_free(port + 1):
            return port
    raise RuntimeError("no free loopback port pair for swtpm")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def running_swtpm(timeout: float = 10.0) -> Iterator[Swtpm]:
    with tempfile.TemporaryDirectory(prefix="swtpm-") as state:
        state = os.path.abspath(state)
        port = _free_port_pair()
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"swtpm exited: {proc.stderr.read().decode()}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("swtpm did not start listening in time")
                time.sleep(0.02)
            yield Swtpm(port=port, ctrl_port=port + 1, state_dir=state, pid=proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
