"""What the engine does to the machine (platform layer): one object, one seam.

The engine never touches the kernel, sysfs, the TPM, logind or systemd itself; it asks
a `Platform`. Unit tests pass a fake with the same methods; the bus tests subclass this
one and replace what must not happen on a development host (load, quiesce, hand-off).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relaunchd.errors import InvalidArgument, KexecFailed, RelaunchError
from relaunchd.launch import assessment, staging
from relaunchd.platform import quiesce, readiness, tpm_extend_log
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import FailAt, SysWriter

HANDOFF_COMMAND = ("systemctl", "start", "--no-block", "--job-mode=replace-irreversibly",
                   "kexec.target")
HANDOFF_TIMEOUT = 60
LINUX_REBOOT_CMD_KEXEC = 0x45584543      # include/uapi/linux/reboot.h
BOOT_ID = "/proc/sys/kernel/random/boot_id"
CMDLINE = "/proc/cmdline"
SLAUNCH_DIR = "/sys/kernel/security/slaunch"   # Secure Launch's securityfs (drtm.md §3.4)
DRTM_LOG_LIMIT = 1 << 20    # the loader reserves 64 KiB (segment_loader.LOG_SIZE)


@dataclass(frozen=True)
class BootFacts:
    """What the new boot looks like, for proving a relaunch (outcome.evaluate)."""

    boot_id: str | None
    cmdline: str | None
    kernel_started: float | None    # epoch seconds (psutil.boot_time; whole seconds)
    now: float                      # epoch seconds when the facts were read
    slaunch: bool                   # Secure Launch's securityfs directory exists
    drtm_pcrs: dict[str, Any]       # {"bank", "values", "reset_state"} or {"error": ...}
    drtm_log: bytes | None = None   # securityfs slaunch/eventlog (DRTM methods only)
    drtm_log_error: str | None = None


class Platform:
    """The real machine (or a fixture tree under `root` for reads)."""

    def __init__(self, root: SysRoot | None = None,
                 probe_config: readiness.ProbeConfig | None = None) -> None:
        self.root = root or SysRoot("/")
        self.probe_config = probe_config or readiness.ProbeConfig(root=self.root.root)

    @classmethod
    def for_config(cls, config: Any) -> Platform:
        return cls(SysRoot(config.root), probe_config_for(config))

    # ------------------------------------------------------------ kexec image

    def kexec_loaded(self) -> bool | None:
        return staging.loaded(self.root)

    def prepare(self, path: str, options: staging.StageOptions,
                progress: Callable[[str, int, int], None] | None = None) -> Any:
        """staging.prepare; a seam so unit tests can stage without a real UKI."""
        return staging.prepare(path, options, progress)

    def load(self, staged: Any) -> None:
        staging.load(staged, self.root)

    def unload(self) -> None:
        staging.unload(self.root)

    def digests(self, staged: Any, banks: Sequence[str]) -> dict[str, dict[str, str]]:
        """Digests of what a measured relaunch extends, from the sealed memfds: kernel,
        initrd (when there is one) and the command line as the kernel gets it (UTF-8,
        without the terminating NUL)."""
        out = {"kernel": _hex(tpm_extend_log.digests_for(staged.kernel.fd, staged.kernel.size,
                                                   banks))}
        if staged.initrd is not None:
            out["initrd"] = _hex(tpm_extend_log.digests_for(staged.initrd.fd, staged.initrd.size,
                                                      banks))
        text = staged.cmdline.text.encode()
        out["cmdline"] = {b: _digest(b, text) for b in banks}
        return out

    def probe(self) -> assessment.Report:
        return assessment.assess(self.probe_config)

    # ------------------------------------------------------------ quiesce

    def quiesce_plan(self, policy: quiesce.QuiescePolicy) -> quiesce.QuiescePlan:
        return quiesce.compute_plan(policy, self.root, exclude_pids={os.getpid()})

    def quiesce(self, plan: quiesce.QuiescePlan, journal: str) -> quiesce.ExecuteReport:
        return quiesce.execute(plan, self.root, self._writer(), journal)

    def rehearse(self, plan: quiesce.QuiescePlan, journal: str) -> quiesce.RehearsalReport:
        return quiesce.rehearse(plan, self.root, self._writer(), journal)

    def rollback(self, journal: str) -> quiesce.RollbackReport:
        return quiesce.rollback(journal, self.root, self._writer())

    def _writer(self) -> SysWriter:
        # The only place the live root is allowed: the daemon on the machine it manages.
        return SysWriter(self.root.root, allow_live=True, fail=_injected_failure())

    # ------------------------------------------------------------ readiness

    def block_inhibitors(self) -> list[dict[str, Any]]:
        """logind block inhibitors for shutdown (none when logind is not there)."""
        from relaunchd.platform import inhibitors

        try:
            found = inhibitors.blocking_shutdown(inhibitors.list_inhibitors())
        except inhibitors.LogindUnavailable:
            return []
        return [{"what": i.what, "who": i.who, "why": i.why, "mode": i.mode,
                 "uid": i.uid, "pid": i.pid} for i in found]

    # ------------------------------------------------------------ measurement

    def measure(self, tcti: str | None, pcr: int, banks: Sequence[str],
                items: Sequence[tuple[str, Mapping[str, bytes]]], log_path: str,
                relaunch_id: str) -> int:
        """Extend and log; the TPM reset counter the log now belongs to."""
        tpm_extend_log.extend(tcti, pcr, banks, items, log_path=log_path, relaunch_id=relaunch_id)
        return tpm_extend_log.reset_count(tcti)

    def measurement_verdict(self, log_path: str, tcti: str | None, pcr: int,
                            banks: Sequence[str]) -> tpm_extend_log.Verdict:
        return tpm_extend_log.verify(log_path, tcti, pcr, banks)

    def tpm_reset_count(self, tcti: str | None) -> int:
        return tpm_extend_log.reset_count(tcti)

    def recover_log(self, log_path: str, tcti: str | None, pcr: int,
                    banks: Sequence[str]) -> int:
        return tpm_extend_log.recover(log_path, tcti, pcr, banks)

    # ------------------------------------------------------------ hand-off

    def handoff(self, kind: str) -> None:
        if kind == "systemd":
            _start_kexec_target()
        elif kind == "immediate":
            _kexec_now()
        else:
            raise InvalidArgument(f"unknown hand-off {kind!r}")

    # ------------------------------------------------------------ after the new boot

    def boot_facts(self, drtm: bool, tcti: str | None) -> BootFacts:
        boot_id = self.root.read_line(BOOT_ID)
        cmdline = self.root.read_line(CMDLINE)
        try:
            import psutil

            started: float | None = float(psutil.boot_time())
        except (ImportError, OSError):
            started = None
        pcrs: dict[str, Any] = {}
        drtm_log = drtm_log_error = None
        if drtm:
            from relaunchd.platform import tpm

            log_read = self.root.read_bytes(tpm.DRTM_LOG, limit=DRTM_LOG_LIMIT)
            if log_read.ok and log_read.value is not None:
                drtm_log = log_read.value
            else:
                drtm_log_error = f"{tpm.DRTM_LOG}: {log_read.error} ({log_read.detail})"

            read = tpm.read_drtm_pcrs(tcti) if tcti else None
            if read is not None and read.ok and read.value is not None:
                pcrs = {"bank": read.value.bank, "values": read.value.values,
                        "reset_state": read.value.reset_state}
            else:
                pcrs = {"error": read.detail if read is not None else "no TPM"}
        return BootFacts(
            boot_id=boot_id.value.strip() if boot_id.ok and boot_id.value else None,
            cmdline=cmdline.value if cmdline.ok else None,
            kernel_started=started, now=time.time(),
            slaunch=os.path.isdir(self.root.host_path(SLAUNCH_DIR)), drtm_pcrs=pcrs,
            drtm_log=drtm_log, drtm_log_error=drtm_log_error)


def _injected_failure() -> FailAt | None:
    """Test-only fault injection (the VM tier's rollback test sets it in a unit drop-in):
    RELAUNCHD_TEST_FAIL_STORE=N fails the N-th sysfs store of a quiesce, N:after makes
    the store happen and then report failure. Never set it on a real machine."""
    spec = os.environ.get("RELAUNCHD_TEST_FAIL_STORE", "")
    nth, _, when = spec.partition(":")
    if not nth.isdigit():
        return None
    return FailAt(nth=int(nth), after=when == "after")


def probe_config_for(config: Any) -> readiness.ProbeConfig:
    return readiness.ProbeConfig(root=config.root, acm_dirs=config.txt.sinit_acm_dirs,
                             dl_handler=config.txt.dl_handler)


def _start_kexec_target() -> None:
    # --no-block: the job takes the system down; waiting for it would mean waiting for
    # our own SIGTERM. The queueing itself is what can fail. `systemctl kexec` would
    # do the same but also check logind inhibitors client-side: the engine does that.
    try:
        result = subprocess.run(HANDOFF_COMMAND, capture_output=True, text=True,
                                timeout=HANDOFF_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RelaunchError(f"cannot run {' '.join(HANDOFF_COMMAND)}: {exc}") from None
    if result.returncode < 0:
        # Killed by a signal: the job was queued and systemd, stopping relaunchd.service
        # on its way to kexec.target, signalled the whole cgroup — systemctl included —
        # before it exited. That is the hand-off succeeding, not failing.
        return
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise RelaunchError(f"{' '.join(HANDOFF_COMMAND)} failed: {why}")


def _kexec_now() -> None:
    """sync, then reboot(LINUX_REBOOT_CMD_KEXEC): the kernel shuts devices down and
    jumps. Services are not stopped and filesystems not unmounted (as `systemctl kexec
    --force --force`); returns only by raising."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot.argtypes = [ctypes.c_int]
    if libc.reboot(LINUX_REBOOT_CMD_KEXEC) != 0:
        err = ctypes.get_errno()
        hint = {errno.EPERM: " (needs CAP_SYS_BOOT)",
                errno.EINVAL: " (no kexec image loaded)"}.get(err, "")
        raise KexecFailed(f"reboot(LINUX_REBOOT_CMD_KEXEC) failed: "
                          f"{os.strerror(err)}{hint}")
    raise KexecFailed("reboot(LINUX_REBOOT_CMD_KEXEC) returned without an error")


def _hex(digests: Mapping[str, bytes]) -> dict[str, str]:
    return {bank: value.hex() for bank, value in digests.items()}


def _digest(bank: str, data: bytes) -> str:
    import hashlib

    return hashlib.new(bank, data).hexdigest()
