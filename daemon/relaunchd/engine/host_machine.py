"""The engine's `Machine` on the real host (engine layer): the platform and launch modules
behind the one interface the engine uses.

Everything is read through one root prefix, so a fixture tree can stand in for the
machine's /proc and /sys; writes (quiesce) go through one `SysWriter`, allowed on the live
root only here, in the daemon on the machine it manages.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from relaunchd.engine.machine import BootFacts, Progress
from relaunchd.errors import InvalidArgument, InvalidImage, KexecFailed, RelaunchError
from relaunchd.formats import uki
from relaunchd.formats.firmware_time import UNKNOWN, FirmwareTime
from relaunchd.launch import assessment, entry_staging, staging
from relaunchd.platform import (
    image_files,
    inhibitors,
    quiesce,
    sealed_volumes,
    tpm,
    tpm_extend_log,
    txt_registers,
)
from relaunchd.platform.boot_entries import ListedEntry, Listing, list_entries
from relaunchd.platform.firmware_time import last_cold_boot
from relaunchd.platform.readiness import ProbeConfig
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.sysroot_writer import FailAt, SysWriter

HANDOFF_COMMAND = ("systemctl", "start", "--no-block", "--job-mode=replace-irreversibly",
                   "kexec.target")
# The fallback when a relaunch cannot happen: an ordinary reboot, queued the same way.
REBOOT_COMMAND = ("systemctl", "start", "--no-block", "--job-mode=replace-irreversibly",
                  "reboot.target")
HANDOFF_TIMEOUT = 60
LINUX_REBOOT_CMD_KEXEC = 0x45584543      # include/uapi/linux/reboot.h
BOOT_ID = "/proc/sys/kernel/random/boot_id"
CMDLINE = "/proc/cmdline"
SLAUNCH_DIR = "/sys/kernel/security/slaunch"   # Secure Launch's securityfs (drtm.md §3.4)
DRTM_LOG_LIMIT = 1 << 20    # the loader reserves 64 KiB (segment_loader.LOG_SIZE)
UKI_SUFFIX = ".efi"


class HostMachine:
    """The real machine (or a fixture tree under `root` for reads)."""

    def __init__(self, root: SysRoot | None = None, probe_config: ProbeConfig | None = None,
                 inhibitor_source: inhibitors.InhibitorSource | None = None) -> None:
        self.root = root or SysRoot("/")
        self.probe_config = probe_config or ProbeConfig(root=self.root.root)
        # None: no logind to ask (the daemon passes bus.logind's source).
        self.inhibitor_source = inhibitor_source

    @classmethod
    def for_config(cls, config: Any,
                   inhibitor_source: inhibitors.InhibitorSource | None = None) -> HostMachine:
        return cls(SysRoot(config.root), config.probe_config(), inhibitor_source)

    # ------------------------------------------------------------ images

    def find_images(self, directories: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        found: list[str] = []
        for base in directories:
            for directory in (base, os.path.join(base, "EFI", "Linux")):
                try:
                    names = sorted(os.listdir(directory))
                except OSError:
                    continue
                for name in names:
                    path = os.path.join(directory, name)
                    if not name.lower().endswith(UKI_SUFFIX) or not os.path.isfile(path) \
                            or os.path.islink(path):
                        continue
                    real = os.path.realpath(path)
                    if real not in seen:
                        seen.add(real)
                        found.append(path)
        return found

    def describe_image(self, path: str, policy: image_files.ImagePolicy) -> dict[str, Any]:
        """Read through the descriptor `Stage` would use (`image_files.open_allowed`);
        an image the policy refuses is still described (opened as `inspect` opens a
        file), with the refusal as its `error`."""
        entry: dict[str, Any] = {"path": path}
        refusal: str | None = None
        try:
            try:
                fd = image_files.open_allowed(path, policy).fd   # the fd is ours now
            except InvalidImage as exc:
                refusal = str(exc)
                fd = image_files.open_regular(path)
            try:
                st = os.fstat(fd)
                entry.update(size=st.st_size, mtime=int(st.st_mtime))
                image = uki.from_fd(fd, path, owns_fd=True)
            except BaseException:
                os.close(fd)
                raise
            with image:
                resolved = image.resolve(None)
                osrel = image.os_release(resolved)
                entry.update(
                    title=osrel.get("PRETTY_NAME") or osrel.get("NAME") or "",
                    uname=image.uname(resolved) or "",
                    signed=bool(image.headers.cert_table_size),
                    profiles=len(image.profiles))
        except (InvalidImage, InvalidArgument, OSError) as exc:
            entry["error"] = str(exc)
        if refusal is not None:
            entry["error"] = refusal
        return entry

    def inspect_image(self, path: str, *, profile: int | None, banks: Sequence[str],
                      trusted: list) -> dict[str, Any]:
        from relaunchd.formats import image_report

        with image_files.open_image(path) as image:
            report = image_report.inspect_image(image, profile=profile, banks=banks,
                                                trusted=trusted)
        return report.to_json()

    def trusted_certificates(self, paths: Sequence[str]) -> list:
        # Imported on use: cryptography costs ~40 ms, which a daemon with no trust
        # configured never pays.
        from relaunchd.platform.trust_store import load_certificates

        return load_certificates(paths)

    def check_location(self, path: str, policy: image_files.ImagePolicy) -> None:
        image_files.check_location(path, policy)

    # ------------------------------------------------------------ boot loader entries

    def boot_entries(self, *, esp: str | None, xbootldr: str | None,
                     trusted: list | None) -> Listing:
        return list_entries(self.root, esp=esp, xbootldr=xbootldr,
                                         trusted=trusted)

    def prepare_entry(self, listed: ListedEntry, options: staging.StageOptions,
                      *, allow_unsigned_parts: bool,
                      progress: Progress | None = None) -> staging.StagedImage:
        return entry_staging.prepare(listed, options, allow_unsigned_parts=allow_unsigned_parts,
                                     progress=progress)

    # ------------------------------------------------------------ kexec image

    def kexec_loaded(self) -> bool | None:
        return staging.loaded(self.root)

    def prepare(self, path: str, options: staging.StageOptions,
                progress: Progress | None = None) -> staging.StagedImage:
        return staging.prepare(path, options, progress)

    def load(self, staged: staging.StagedImage) -> None:
        staging.load(staged, self.root)

    def unload(self) -> None:
        staging.unload(self.root)

    def digests(self, staged: staging.StagedImage,
                banks: Sequence[str]) -> dict[str, dict[str, str]]:
        """From the sealed memfds: kernel, initrd (when there is one) and the command line
        as the kernel gets it (UTF-8, without the terminating NUL); for a TXT launch also
        the DL handler file."""
        out = {"kernel": _hex(tpm_extend_log.digests_for(staged.kernel.fd, staged.kernel.size,
                                                         banks))}
        if staged.initrd is not None:
            out["initrd"] = _hex(tpm_extend_log.digests_for(staged.initrd.fd,
                                                            staged.initrd.size, banks))
        text = staged.cmdline.text.encode()
        out["cmdline"] = {b: hashlib.new(b, text).hexdigest() for b in banks}
        if staged.dl_handler_file is not None:
            # The code that runs GETSEC[SENTER] is relaunchd's choice too; the file as
            # installed (the parameter block filled in at staging derives from the rest).
            out["dl-handler"] = {b: hashlib.new(b, staged.dl_handler_file).hexdigest()
                                 for b in banks}
        return out

    # ------------------------------------------------------------ readiness

    def readiness(self) -> assessment.Report:
        return assessment.assess(self.probe_config)

    def sealed_volumes(self, method: str, tcti: str | None,
                       measurement_pcr: int | None) -> list[dict[str, Any]]:
        context = sealed_volumes.Context(tcti=tcti, method=method,
                                         measurement_pcr=measurement_pcr)
        return sealed_volumes.report_or_problem(self.root, context)

    def block_inhibitors(self) -> list[dict[str, Any]]:
        if self.inhibitor_source is None:
            return []
        try:
            found = inhibitors.blocking_shutdown(self.inhibitor_source.list_inhibitors())
        except inhibitors.LogindUnavailable:
            return []
        return [{"what": i.what, "who": i.who, "why": i.why, "mode": i.mode,
                 "uid": i.uid, "pid": i.pid} for i in found]

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

    # ------------------------------------------------------------ measurement

    def measure(self, tcti: str | None, pcr: int, banks: Sequence[str],
                items: Sequence[tuple[str, Mapping[str, bytes]]], log_path: str,
                relaunch_id: str) -> int:
        tpm_extend_log.extend_and_log(tcti, pcr, banks, items, log_path=log_path,
                                      relaunch_id=relaunch_id)
        return tpm_extend_log.reset_count(tcti)

    def replay_log(self, log_path: str, tcti: str | None, pcr: int,
                   banks: Sequence[str]) -> tpm_extend_log.ReplayResult:
        return tpm_extend_log.replay(log_path, tcti, pcr, banks)

    def tpm_reset_count(self, tcti: str | None) -> int:
        return tpm_extend_log.reset_count(tcti)

    def recover_log(self, log_path: str, tcti: str | None, pcr: int,
                    banks: Sequence[str]) -> int:
        return tpm_extend_log.recover(log_path, tcti, pcr, banks)

    # ------------------------------------------------------------ hand-off and new boot

    def handoff(self, kind: str) -> None:
        if kind == "systemd":
            _queue_shutdown(HANDOFF_COMMAND)
        elif kind == "reboot":
            _queue_shutdown(REBOOT_COMMAND)
        elif kind == "immediate":
            _kexec_now()
        else:
            raise InvalidArgument(f"unknown hand-off {kind!r}")

    def boot_id(self) -> str | None:
        read = self.root.read_line(BOOT_ID)
        return read.value.strip() if read.ok and read.value else None

    def boot_facts(self, drtm: bool, tcti: str | None) -> BootFacts:
        cmdline = self.root.read_line(CMDLINE)
        try:
            import psutil

            started: float | None = float(psutil.boot_time())
        except (ImportError, OSError):
            started = None
        pcrs: dict[str, Any] = {}
        drtm_log = drtm_log_error = None
        if drtm:
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
        errorcode = None
        if drtm:
            registers = txt_registers.read_registers(self.root)
            if registers.ok and isinstance(registers.value, txt_registers.TxtRegisters):
                errorcode = registers.value.errorcode
        return BootFacts(
            boot_id=self.boot_id(), cmdline=cmdline.value if cmdline.ok else None,
            kernel_started=started, now=time.time(),
            slaunch=self.root.is_dir(SLAUNCH_DIR), drtm_pcrs=pcrs,
            drtm_log=drtm_log, drtm_log_error=drtm_log_error, txt_errorcode=errorcode)

    def firmware_time(self) -> dict[str, Any]:
        try:
            return last_cold_boot(self.root).to_json()
        except Exception as exc:   # a figure for a report: never fail the proof over it
            return FirmwareTime(UNKNOWN, reason=f"cannot read the firmware time: {exc}"
                                ).to_json()


def _injected_failure() -> FailAt | None:
    """Test-only fault injection (the VM tier's rollback test sets it in a unit drop-in):
    RELAUNCHD_TEST_FAIL_STORE=N fails the N-th sysfs store of a quiesce, N:after makes
    the store happen and then report failure. Never set it on a real machine."""
    spec = os.environ.get("RELAUNCHD_TEST_FAIL_STORE", "")
    nth, _, when = spec.partition(":")
    if not nth.isdigit():
        return None
    return FailAt(nth=int(nth), after=when == "after")


def _queue_shutdown(command: tuple[str, ...]) -> None:
    # --no-block: the job takes the system down; waiting for it would mean waiting for
    # our own SIGTERM. The queueing itself is what can fail. `systemctl kexec` would
    # do the same but also check logind inhibitors client-side: the engine does that.
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=HANDOFF_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RelaunchError(f"cannot run {' '.join(command)}: {exc}") from None
    if result.returncode < 0:
        # Killed by a signal: the job was queued and systemd, stopping relaunchd.service
        # on its way to kexec.target, signalled the whole cgroup — systemctl included —
        # before it exited. That is the hand-off succeeding, not failing.
        return
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise RelaunchError(f"{' '.join(command)} failed: {why}")


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
