"""One running guest: QEMU (TCG) + swtpm, a command channel, bounded everything.

Channels:
  - ttyS0: the serial console, written to `console.log` (tests) or the
    terminal (`make vm-shell`); its last lines go into every failure message.
  - a virtio-serial port `org.relaunchd.agent`: the guest's rld-agent answers
    JSON requests (ping → boot id, run → exit status + output, put → file).
    The harness listens on a unix socket and QEMU connects to it at start, so
    the host side is connected before the guest exists and across relaunches.

Every wait has a deadline; QEMU and swtpm get PR_SET_PDEATHSIG so they die
with the harness even if it is SIGKILLed, a lifetime timer kills them after
`max_lifetime`, and close() kills both by PID whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .image import GuestImage
from .uefi import fat_image

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.relaunchd.agent"
READY_STATES = ("running", "degraded")
PUT_CHUNK = 192 * 1024
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


class GuestError(RuntimeError):
    """Something in or around the guest failed; the message carries the console tail."""


@dataclass(frozen=True)
class Result:
    rc: int
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class MachineSpec:
    image: GuestImage
    data_disk: Path | None = None
    memory_mib: int = 1536
    cpus: int = 2  # two, so that AP offlining in the guest is real
    no_reboot: bool = True  # a guest reboot ends QEMU (fail fast); False to time reboots
    append: str = ""  # extra kernel command line
    console_stdio: bool = False  # `make vm-shell`: console on the terminal
    # UEFI boot instead of -kernel: OVMF runs whatever the ESP directory holds
    # (systemd-boot + a UKI), so systemd-stub measures the UKI into the TPM.
    esp: Path | None = None
    # A writable ESP with this much room to spare (kernel-install adds kernels to it);
    # None: read-only, just big enough.
    esp_spare_mib: int | None = None
    max_lifetime: float = 45 * 60
    # Writable scratch disks, each (raw image, serial): /dev/disk/by-id/virtio-<serial>.
    scratch_disks: tuple[tuple[Path, str], ...] = ()
    # QEMU's -cpu (None: its default). "qemu64,-hypervisor" hides the CPUID hypervisor
    # bit, without which systemd-boot 252 records no LoaderTime*USec (src/boot/efi/ticks.c
    # refuses the TSC in a hypervisor).
    cpu: str | None = None
    # Guest port 22 forwarded from 127.0.0.1:<ssh_port> (QEMU user networking with
    # restrict=on: the guest reaches nothing, only the host's loopback reaches it).
    ssh_port: int | None = None


@dataclass
class Boot:
    boot_id: str
    seconds: float  # from the request (QEMU start, relaunch, reboot) to ready
    state: str  # systemctl is-system-running
    since: float  # time.monotonic() of the request
    ready: float  # time.monotonic() when ready


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a QEMU hostfwd)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@dataclass
class Machine:
    spec: MachineSpec
    runtime: Path = field(init=False)
    _qemu: subprocess.Popen | None = field(default=None, init=False)
    _swtpm: subprocess.Popen | None = field(default=None, init=False)
    _listener: socket.socket | None = field(default=None, init=False)
    _chan: socket.socket | None = field(default=None, init=False)
    _buf: bytes = field(default=b"", init=False)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1), init=False)
    _lifetime: threading.Timer | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    # Console lines with the host's monotonic time of arrival (±50 ms): phases of
    # a relaunch (shutdown, hand-over, boot) are read off these.
    console: list[tuple[float, str]] = field(default_factory=list, init=False)
    started_at: float = field(default=0.0, init=False)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Machine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        # Unix socket paths must stay short: a private directory under /tmp.
        self.runtime = Path(tempfile.mkdtemp(prefix="rld-vm-"))
        img = self.spec.image
        overlay = self.runtime / "overlay.qcow2"
        # Copy-on-write per run: the cached image stays pristine.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.disk),
                        "-F", "raw", str(overlay)], check=True, timeout=60,
                       capture_output=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.runtime / "agent.sock"))
        self._listener.listen(1)
        self._launch(overlay)

    def _launch(self, overlay: Path) -> None:
        """swtpm and QEMU on the run directory's state (TPM, NVRAM, overlay), then the
        agent channel: a power-on, the first or again after `power_cycle`."""
        self._start_swtpm()
        cmd = self._qemu_command(overlay)
        (self.runtime / "qemu.cmd").write_text(" ".join(cmd) + "\n")
        first = self._qemu is None
        if first:
            self.started_at = time.monotonic()
        with open(self.runtime / "qemu.log", "ab") as qemu_log:
            self._qemu = subprocess.Popen(
                cmd, stdin=None if self.spec.console_stdio else subprocess.DEVNULL,
                stdout=None if self.spec.console_stdio else subprocess.DEVNULL,
                stderr=qemu_log, start_new_session=not self.spec.console_stdio,
                preexec_fn=_die_with_parent)
        if first:
            self._lifetime = threading.Timer(self.spec.max_lifetime, self._kill_processes)
            self._lifetime.daemon = True
            self._lifetime.start()
            if not self.spec.console_stdio:
                threading.Thread(target=self._follow_console, daemon=True).start()
        self._listener.settimeout(1.0)
        deadline = time.monotonic() + 60
        while self._chan is None:
            self._check_alive("connecting the agent channel")
            if time.monotonic() > deadline:
                raise self._error("QEMU did not connect the agent channel within 60 s")
            with contextlib.suppress(TimeoutError):
                self._chan, _ = self._listener.accept()

    def _start_swtpm(self) -> None:
        state = self.runtime / "tpm"
        state.mkdir(exist_ok=True)          # kept across a power cycle, as the TPM's NV is
        sock = self.runtime / "swtpm.sock"
        sock.unlink(missing_ok=True)
        # No --flags startup-*: the firmware (SeaBIOS) sends TPM2_Startup after
        # every reset, as on real hardware. --terminate: exit when QEMU does.
        self._swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state.resolve()}",
             "--ctrl", f"type=unixio,path={sock}", "--terminate",
             "--log", f"file={self.runtime / 'swtpm.log'},level=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while not sock.exists():
            if self._swtpm.poll() is not None or time.monotonic() > deadline:
                log = "(no log)"
                with contextlib.suppress(OSError):
                    log = (self.runtime / "swtpm.log").read_text(errors="replace")[-2000:]
                raise GuestError(f"swtpm did not come up:\n{log}")
            time.sleep(0.02)

    def _qemu_command(self, overlay: Path) -> list[str]:
        s, img = self.spec, self.spec.image
        cmd = [
            QEMU, "-accel", "tcg", "-machine", "pc", "-smp", str(s.cpus),
            "-m", str(s.memory_mib), "-nodefaults", "-no-user-config",
            *(["-cpu", s.cpu] if s.cpu else []),
            # cache=unsafe: the overlay is thrown away after the run. First drive:
            # the root is /dev/vda in every boot mode.
            "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
            "-chardev", f"socket,id=chrtpm,path={self.runtime / 'swtpm.sock'}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,path={self.runtime / 'agent.sock'}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}",
            "-device", "virtio-rng-pci",
        ]
        if s.ssh_port is None:
            cmd += ["-nic", "none"]
        else:
            cmd += ["-nic", "user,model=virtio-net-pci,restrict=on,"
                            f"hostfwd=tcp:127.0.0.1:{s.ssh_port}-:22"]
        if s.data_disk:
            cmd += ["-drive", f"file={s.data_disk},format=raw,if=virtio,readonly=on"]
        for n, (disk, serial) in enumerate(s.scratch_disks):
            # The last PCI slots: QEMU creates -device devices before the if=virtio
            # drives, and Linux names virtio disks in slot order; the root stays vda.
            cmd += ["-drive", f"file={disk},format=raw,if=none,id=scratch{n},cache=unsafe",
                    "-device", f"virtio-blk-pci,drive=scratch{n},serial={serial},"
                               f"addr={0x1f - len(s.scratch_disks) + 1 + n:#x}"]
        if s.esp:
            # NVRAM and ESP are made once per run: a power cycle keeps both.
            variables = self.runtime / "OVMF_VARS.fd"
            if not variables.exists():
                shutil.copyfile(OVMF_VARS, variables)
            esp = self.runtime / "esp.img"
            if not esp.exists():
                fat_image(s.esp, esp, s.esp_spare_mib or 0)
            read_only = ",readonly=on" if s.esp_spare_mib is None else ""
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
                    "-drive", f"file={esp},format=raw,if=virtio{read_only}"]
        else:
            cmd += ["-kernel", str(img.kernel), "-initrd", str(img.initrd),
                    "-append", f"{img.cmdline} {s.append}".strip()]
        if s.console_stdio:
            cmd += ["-nographic", "-serial", "mon:stdio"]
        else:
            cmd += ["-display", "none",
                    # append: one log across a power cycle (the follower reads on).
                    "-chardev", f"file,id=con,path={self.runtime / 'console.log'},append=on",
                    "-serial", "chardev:con"]
        if s.no_reboot:
            cmd.append("-no-reboot")
        return cmd

    def close(self) -> None:
        """Kill QEMU and swtpm (always), keep the last console log, drop the run dir."""
        if self._lifetime:
            self._lifetime.cancel()
        self._stop.set()
        self._kill_processes()
        for s in (self._chan, self._listener):
            if s:
                s.close()
        self._chan = self._listener = None
        if getattr(self, "runtime", None) and self.runtime.exists():
            from support.ukibuild import cache_dir

            keep = cache_dir() / "vm" / "last-run"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            for name in ("console.log", "qemu.log", "swtpm.log", "qemu.cmd"):
                with contextlib.suppress(OSError):
                    shutil.copy(self.runtime / name, keep / name)
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _kill_processes(self) -> None:
        for proc in (self._qemu, self._swtpm):
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                if self.spec.console_stdio and proc is self._qemu:
                    proc.kill()  # in our session (it owns the terminal): by PID
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to end by itself (poweroff, or reboot with -no-reboot)."""
        assert self._qemu
        try:
            return self._qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"QEMU still running after {timeout:.0f} s") from None

    # ------------------------------------------------------------------ diagnostics

    def _follow_console(self) -> None:
        path, partial = self.runtime / "console.log", b""
        with contextlib.suppress(OSError):
            while not path.exists() and not self._stop.wait(0.05):
                pass
            with open(path, "rb") as f:
                while not self._stop.wait(0.05):
                    partial += f.read()
                    *lines, partial = partial.split(b"\n")
                    now = time.monotonic()
                    self.console += [(now, _ANSI.sub("", x.decode(errors="replace")))
                                     for x in lines]

    def console_time(self, text: str, after: float) -> float | None:
        """When the first console line containing `text` arrived after `after`."""
        return next((t for t, line in list(self.console) if t >= after and text in line), None)

    def console_tail(self, lines: int = 40) -> str:
        try:
            data = (self.runtime / "console.log").read_bytes()[-64 * 1024:]
        except (OSError, AttributeError):
            return "(no console log)"
        text = _ANSI.sub("", data.decode(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, what: str) -> GuestError:
        qemu_log = ""
        with contextlib.suppress(OSError, AttributeError):
            qemu_log = (self.runtime / "qemu.log").read_text(errors="replace")[-2000:].strip()
        extra = f"\n--- qemu stderr ---\n{qemu_log}" if qemu_log else ""
        return GuestError(f"{what}\n--- last console lines ---\n{self.console_tail()}{extra}")

    def _check_alive(self, doing: str) -> None:
        if self._qemu is None or self._qemu.poll() is not None:
            rc = None if self._qemu is None else self._qemu.returncode
            raise self._error(f"QEMU exited ({rc}) while {doing}")

    # ------------------------------------------------------------------ agent protocol

    def _send(self, req: dict, deadline: float, doing: str) -> None:
        assert self._chan
        self._chan.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            self._chan.sendall(json.dumps(req).encode() + b"\n")
        except TimeoutError:
            raise self._error(f"guest not reading the agent channel while {doing}") from None
        except OSError as exc:  # QEMU went away: say why, with the console
            self._check_alive(doing)
            raise self._error(f"agent channel failed while {doing}: {exc}") from None

    def _ping(self) -> None:
        """Ping unless one is still waiting in the socket: while no agent reads the
        port, QEMU stops draining the socket, and a queued ping is delivered the
        moment a (new) agent opens it. A ping QEMU already handed to a guest that
        then went away (relaunch) is lost, so an empty queue means "send again"."""
        assert self._chan
        queued = struct.unpack("i", fcntl.ioctl(self._chan, termios.TIOCOUTQ, b"\0" * 4))[0]
        if queued:
            return
        data = json.dumps({"op": "ping", "id": next(self._ids)}).encode() + b"\n"
        with contextlib.suppress(OSError):  # a dead QEMU is reported by the read
            self._chan.send(data, socket.MSG_DONTWAIT)

    def _next_reply(self, deadline: float, doing: str) -> dict | None:
        """The next agent reply, or None at the deadline."""
        assert self._chan
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"RLD1 "):
                    with contextlib.suppress(ValueError):
                        return json.loads(line[5:])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._check_alive(doing)
            self._chan.settimeout(min(remaining, 0.5))
            try:
                chunk = self._chan.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                self._check_alive(doing)
                raise self._error(f"agent channel failed while {doing}: {exc}") from None
            if not chunk:
                raise self._error(f"agent channel closed by QEMU while {doing}")
            self._buf += chunk

    def request(self, req: dict, timeout: float, doing: str) -> dict:
        req = {**req, "id": next(self._ids)}
        deadline = time.monotonic() + timeout
        self._send(req, deadline, doing)
        while True:
            reply = self._next_reply(deadline, doing)
            if reply is None:
                raise self._error(f"no answer from the guest within {timeout:.0f} s while {doing}")
            if reply.get("id") == req["id"]:
                if "error" in reply:
                    raise self._error(f"guest agent error while {doing}: {reply['error']}")
                return reply

    def wait_agent(self, timeout: float, not_boot_id: str | None = None) -> str:
        """Ping until an agent of a boot other than `not_boot_id` answers; its boot id."""
        deadline = time.monotonic() + timeout
        doing = "waiting for the guest agent"
        while time.monotonic() < deadline:
            self._ping()
            beat = min(deadline, time.monotonic() + 0.2)
            while (reply := self._next_reply(beat, doing)) is not None:
                boot_id = reply.get("boot_id")
                if boot_id and boot_id != not_boot_id:
                    return boot_id
        raise self._error(f"guest agent did not answer within {timeout:.0f} s")

    # ------------------------------------------------------------------ commands

    def run(self, cmd: str, timeout: float = 120, check: bool = True) -> Result:
        """Run `bash -c cmd` in the guest as root; (exit status, stdout+stderr)."""
        # The host waits a little longer than the guest-side timeout, so a slow
        # command is reported by the agent (with its output) rather than lost.
        reply = self.request({"op": "run", "cmd": cmd, "timeout": timeout}, timeout + 30,
                             f"running {cmd!r}")
        result = Result(rc=reply["rc"], output=base64.b64decode(reply["out"]).decode(
            errors="replace"), timed_out=bool(reply.get("timed_out")))
        if check and not result.ok:
            why = f"timed out after {timeout:.0f} s" if result.timed_out else f"exit {result.rc}"
            raise GuestError(f"guest command {cmd!r} failed ({why}):\n{result.output}")
        return result

    def put(self, path: str, data: bytes | Path, mode: int = 0o644,
            timeout: float = 300) -> None:
        """Copy a file into the guest over the agent channel (chunked)."""
        if isinstance(data, Path):
            data = data.read_bytes()
        deadline = time.monotonic() + timeout
        for offset in range(0, max(len(data), 1), PUT_CHUNK):
            chunk = data[offset:offset + PUT_CHUNK]
            self.request({"op": "put", "path": path, "mode": mode, "append": offset > 0,
                          "data": base64.b64encode(chunk).decode()},
                         max(deadline - time.monotonic(), 1.0), f"copying {path} into the guest")

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id").output.strip()

    # ------------------------------------------------------------------ boots

    def wait_ready(self, timeout: float, since: float, not_boot_id: str | None = None) -> Boot:
        """Wait for a (new) boot to finish: agent up, then systemd done starting."""
        deadline = time.monotonic() + timeout
        boot_id = self.wait_agent(timeout, not_boot_id)
        remaining = max(deadline - time.monotonic(), 5.0)
        state = self.run("systemctl is-system-running --wait", timeout=remaining,
                         check=False).output.strip()
        ready = time.monotonic()
        if state not in READY_STATES:
            failed = self.run("systemctl --failed --no-legend --plain", check=False).output
            raise self._error(f"guest boot ended in state {state!r}; failed units:\n{failed}")
        return Boot(boot_id=boot_id, seconds=ready - since, state=state, since=since, ready=ready)

    def boot(self, timeout: float = 600) -> Boot:
        """Start QEMU (if needed) and wait until the guest is ready."""
        if self._qemu is None:
            self.start()
        return self.wait_ready(timeout, since=self.started_at)

    def transition(self, command: str, timeout: float = 600) -> Boot:
        """Run `command` (a non-blocking relaunch/reboot request); wait for the next boot."""
        old = self.boot_id()
        since = time.monotonic()
        self.run(command, timeout=60)
        return self.wait_ready(timeout, since=since, not_boot_id=old)

    def power_cycle(self, command: str, timeout: float = 600) -> Boot:
        """Run `command` (a reboot request) in a machine started with -no-reboot: QEMU
        ends at the guest's reset and is started again on the same disk overlay, NVRAM
        and TPM state — a cold boot, as after a power cycle. Rebooting OVMF through a
        warm reset under TCG has hung for good after "reboot: machine restart" (seen in
        CI, not reproducible on demand); a fresh QEMU boots it as every first boot does."""
        assert self.spec.no_reboot, "power_cycle needs MachineSpec(no_reboot=True)"
        old = self.boot_id()
        since = time.monotonic()
        self.run(command, timeout=60)
        self.wait_exit(timeout)
        if self._chan:
            self._chan.close()
        self._chan, self._buf = None, b""
        self._kill_processes()              # swtpm, if it has not ended with QEMU
        self._launch(self.runtime / "overlay.qcow2")
        return self.wait_ready(timeout, since=since, not_boot_id=old)

    def transition_attached(self, command: str, timeout: float = 600,
                            command_timeout: float = 180) -> tuple[Result, Boot]:
        """Run `command` — a blocking relaunch request such as `relaunchctl relaunch
        --wait` — attached: its exit status and output as the old system goes down
        (the agent outlives the shutdown's unit stops), then wait for the next boot."""
        old = self.boot_id()
        since = time.monotonic()
        result = self.run(command, timeout=command_timeout, check=False)
        return result, self.wait_ready(timeout, since=since, not_boot_id=old)

    def poweroff(self, timeout: float = 180) -> None:
        """Clean shutdown; QEMU ends by itself. Falls back to close()'s kill."""
        if not self.running:
            return
        with contextlib.suppress(GuestError):
            self.run("systemctl --no-block poweroff", timeout=30)
        self.wait_exit(timeout)
