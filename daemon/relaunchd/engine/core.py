"""The relaunch state machine (engine layer): states, locks, properties, change notification.

States: idle → staging → staged → (quiescing →) relaunching, plus failed. Adapters (D-Bus,
CLI) call the methods and read the properties; every property is JSON-able, and `notify`
is told the names of the properties that changed (the engine's own names — `state`,
`staged_image`, … — which the bus maps to D-Bus properties), from whatever thread changed
them.

The behaviour is split by feature, each in its own module over this core: staging
(`stage.Stager`), the relaunch and its rehearsal (`relaunch.Relauncher`), proving a relaunch
in the boot it led to (`proof.AfterBootProof`), and the image catalogue
(`catalogue.Catalogue`). The machine is reached only through `machine.Machine`.

Rules the code keeps:
- one mutating operation at a time (`begin_operation`); a second one gets Busy;
- long work (copy, hash, verify, load) runs in a worker thread; the caller gets the
  relaunch id at once and follows State/Progress;
- "staged" only ever means "recorded in staged.json *and* loaded in the kernel": every
  path that fails or is cancelled unloads and removes what it added, a replacement that
  fails leaves the image staged before it staged (engine.stage), and `reconcile` repairs
  the two after a crash;
- a relaunch writes pending.json before the hand-off and removes it again if the hand-off
  fails, so nothing is left half-done.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from relaunchd import __version__
from relaunchd.engine import state
from relaunchd.engine.catalogue import Catalogue
from relaunchd.engine.config import Config
from relaunchd.engine.last_error import as_error, error_json, kexec_loaded_text
from relaunchd.engine.machine import Machine
from relaunchd.engine.progress import idle, progress_of
from relaunchd.engine.proof import AfterBootProof
from relaunchd.engine.relaunch import Relauncher
from relaunchd.engine.stage import Stager
from relaunchd.errors import Busy, InvalidArgument
from relaunchd.launch import registry
from relaunchd.platform import sealed_volumes

log = logging.getLogger("relaunchd.engine")

STATES = ("idle", "staging", "staged", "quiescing", "relaunching", "failed")
METHODS = ("auto", *registry.NAMES)
PROPERTIES = ("state", "progress", "staged_image", "capabilities", "can_relaunch",
              "last_relaunch", "last_error", "version")
PROGRESS_INTERVAL = 0.1          # at most 10 Progress notifications per second
# While a replacement is staging, the image staged before it is still loaded and recorded.
HAS_STAGED_IMAGE = ("staging", "staged", "quiescing", "relaunching")


class Engine:
    def __init__(self, config: Config, machine: Machine, *,
                 notify: Callable[[set[str]], None] = lambda names: None) -> None:
        self.config = config
        self.machine = machine
        self.store = state.StateStore(config.state_dir, config.runtime_dir)
        self._notify = notify
        self._op_lock = threading.Lock()      # held for the whole of one mutating operation
        self.lock = threading.RLock()         # guards the fields below; never held over I/O
        self._done = threading.Condition(self.lock)
        self.worker: threading.Thread | None = None
        self._state = "idle"
        self._progress: dict[str, Any] = idle()
        self._progress_sent = 0.0
        self.record: state.StagedRecord | None = None
        self.staged: Any = None               # the StagedImage (memfds) while staged
        self._capabilities: dict[str, Any] = {}
        self._derived_seen: dict[str, Any] = {}   # derived properties as last notified
        self._kexec_core: bool | None = None
        self._last_error: dict[str, Any] = {}
        self._last_relaunch: dict[str, Any] = {}
        self._can_relaunch = "no"
        self._closed = False
        self._stager = Stager(self)
        self._relauncher = Relauncher(self)
        self._catalogue = Catalogue(config, machine)
        try:
            self.refresh_capabilities()
        except Exception:
            # A probe that cannot run must not keep the service down: report
            # nothing ready; Check() will try again and raise the error.
            log.exception("probing the platform failed")
        self._last_relaunch = self.store.load_last_relaunch()
        AfterBootProof(self).conclude_pending()
        self.reconcile()

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> str:
        with self.lock:
            return self._state

    @property
    def progress(self) -> dict:
        with self.lock:
            return dict(self._progress)

    @property
    def staged_image(self) -> dict:
        with self.lock:
            return _staged_json(self.record) if self._state in HAS_STAGED_IMAGE else {}

    @property
    def capabilities(self) -> dict:
        with self.lock:
            return copy.deepcopy(self._capabilities)

    @property
    def can_relaunch(self) -> str:
        with self.lock:
            return self._can_relaunch

    @property
    def last_relaunch(self) -> dict:
        with self.lock:
            return copy.deepcopy(self._last_relaunch)

    @property
    def last_error(self) -> dict:
        with self.lock:
            return dict(self._last_error)

    @property
    def version(self) -> str:
        return __version__

    # ------------------------------------------------------------ what adapters call

    def check(self, method: str | None = None) -> dict:
        """A fresh probe, as `relaunchctl check --json` prints it, plus
        `method`/`ready` for the method asked about (auto: the engine's choice)."""
        if method is not None and method not in METHODS:
            raise InvalidArgument(f"unknown launch method {method!r} "
                                  f"(one of {', '.join(METHODS)})")
        report = self.refresh_capabilities()
        result = report.to_json()
        chosen = method or "auto"
        result["method"] = chosen
        result["ready"] = (self.capabilities["best"] is not None if chosen == "auto"
                           else report.verdicts[chosen].ready)
        return result

    def list_images(self) -> list[dict]:
        """The catalogue, each entry marked `staged` when it is the staged image."""
        with self.lock:
            staged = self.record.path if self.record is not None \
                and self._state in HAS_STAGED_IMAGE else None
        return self._catalogue.list_images(staged_path=staged)

    def inspect(self, path: str, profile: int | None = None) -> dict:
        return self._catalogue.inspect(path, profile)

    def stage(self, path: str, *, profile: int | None = None, method: str | None = None,
              cmdline: str | None = None, append: tuple[str, ...] | list[str] = (),
              loader: str | None = None, entry: str | None = None,
              if_auto_stage: bool = False) -> str:
        return self._stager.stage(path, profile=profile, method=method, cmdline=cmdline,
                                  append=append, loader=loader, entry=entry,
                                  if_auto_stage=if_auto_stage)

    def cancel(self, *, if_entry: str | None = None, if_kernel: str | None = None) -> None:
        self._stager.cancel(if_entry=if_entry, if_kernel=if_kernel)

    def relaunch(self, *, force: bool = False, immediate: bool = False,
                 fallback: str | None = None) -> str:
        return self._relauncher.relaunch(force=force, immediate=immediate, fallback=fallback)

    def rehearse(self) -> dict:
        return self._relauncher.rehearse()

    def history(self, limit: int = 50) -> list[dict]:
        """Past events, newest first."""
        if limit < 0:
            raise InvalidArgument("limit must not be negative")
        return [e.to_json() for e in reversed(self.store.history(limit))]

    def wait(self, timeout: float | None = None) -> str:
        """Until no operation runs (tests, CLI); returns the state."""
        with self._done:
            self._done.wait_for(lambda: self.worker is None, timeout)
            return self._state

    def reconcile(self) -> None:
        """Make State agree with staged.json and /sys/kernel/kexec_loaded:
        never "staged" for an image that is not loaded, nor the reverse."""
        self.begin_operation()
        try:
            if self.state in ("quiescing", "relaunching"):
                raise Busy(f"a relaunch is under way (state {self.state})")
            self.reconcile_locked()
        finally:
            self.release_operation()

    def close(self) -> None:
        """Stop: abort a running stage, release the memfds. A staged image
        stays loaded (and recorded) for the next daemon to find."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
        self._stager.abort()
        self.wait(timeout=60)
        with self.lock:
            staged, self.staged = self.staged, None
        if staged is not None:
            staged.close()

    # ------------------------------------------------------------ what the features share

    def begin_operation(self) -> None:
        """Take the one-operation lock or raise Busy; `release_operation` (or a worker's
        `end_operation`) gives it back."""
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")

    def release_operation(self) -> None:
        self._op_lock.release()

    def end_operation(self) -> None:
        """Under `lock`: a worker's final transition and the op lock's release are one
        step, so nobody sees a final state while still Busy."""
        self.worker = None
        self._op_lock.release()
        self._done.notify_all()

    def transition(self, **fields: Any) -> None:
        """Set state/progress/last_error/last_relaunch and tell who listens."""
        self.emit(self.update(**fields))

    def update(self, **fields: Any) -> set[str]:
        """Set fields under the lock; the names of the properties that changed. For a
        transition that must happen together with other changes under `lock` (then
        `emit` the names after releasing it)."""
        with self.lock:
            changed = set()
            for key, value in fields.items():
                if getattr(self, f"_{key}") != value:
                    setattr(self, f"_{key}", value)
                    changed.add(key)
            # Properties derived from fields others may have set directly
            # (record, capabilities): compared with what was last announced.
            self._can_relaunch = self._compute_can_relaunch()
            derived = {"staged_image": self.staged_image, "can_relaunch": self._can_relaunch,
                       "capabilities": copy.deepcopy(self._capabilities)}
            changed |= {name for name, value in derived.items()
                        if self._derived_seen.get(name) != value}
            self._derived_seen = derived
            if "progress" in changed:
                self._progress_sent = time.monotonic()
            return changed

    def set_progress(self, step: str, done: int, total: int, *, force: bool = False) -> None:
        """Progress is always current; notifications at most every 100 ms."""
        now = time.monotonic()
        with self.lock:
            value = progress_of(step, done, total)
            if value == self._progress:
                return
            self._progress = value
            if not force and now - self._progress_sent < PROGRESS_INTERVAL:
                return
            self._progress_sent = now
        self.emit({"progress"})

    def emit(self, names: set[str]) -> None:
        if not names:
            return
        try:
            self._notify(set(names))
        except Exception:
            log.exception("property-change callback failed")

    def record_history(self, event: str, relaunch_id: str | None, detail: dict) -> None:
        try:
            self.store.append_history(state.HistoryEntry(time=state.now(), event=event,
                                                         id=relaunch_id, detail=detail))
        except OSError as exc:
            log.error("cannot append to %s: %s", self.store.history_path, exc)

    def refresh_capabilities(self) -> Any:
        """Probe the platform now; the assessment report (Capabilities is its summary)."""
        report = self.machine.readiness()
        caps: dict[str, Any] = {
            m: {"ready": v.ready, "reasons": [c.id for c in v.reasons]}
            for m, v in report.verdicts.items()}
        ready = [m for m in registry.NAMES if caps.get(m, {}).get("ready")]
        if self.config.launch.require_drtm:
            ready = [m for m in ready if registry.is_drtm(m)]
        configured = self.config.launch.method
        caps["best"] = (ready[0] if ready else None) if configured == "auto" else (
            configured if configured in ready else None)
        # For the method a relaunch would use: a DRTM launch resets PCRs 17-22.
        measurement = self.config.measurement
        caps["volumes"] = [sealed_volumes.summary(v) for v in self.machine.sealed_volumes(
            caps["best"] or "kexec", measurement.tcti, measurement.pcr)]
        support = report.facts.get("kexec.support")
        core = support.value.get("kexec_core") if support is not None and support.ok \
            and isinstance(support.value, dict) else None
        with self.lock:
            self._capabilities = caps
            self._kexec_core = core
        self.transition()
        return report

    def reconcile_locked(self) -> None:
        """`reconcile` with the op lock already held."""
        record = self.store.load_staged()
        loaded = self.machine.kexec_loaded()
        with self.lock:
            memory, failed = self.staged, self._state == "failed"
        if memory is not None and (record is None or record.id != memory.id):
            memory.close()     # the memfds of an image no longer staged
            memory = None
        if record is not None and loaded is True:
            with self.lock:
                self.staged, self.record = memory, record
            self.transition(state="staged", progress=progress_of("staged", 1, 1, 100))
            log.info("reconcile: %s is staged and loaded", record.id)
            return
        if record is not None:
            log.warning("reconcile: staged record %s, but no kexec image is loaded "
                        "(kexec_loaded: %s; unloaded by someone else?): forgetting it",
                        record.id, kexec_loaded_text(loaded))
            self.store.clear_staged()
            self.record_history("staged-lost", record.id, {"kexec_loaded": loaded})
        elif loaded is True:
            log.warning("reconcile: a kexec image is loaded but nothing is recorded as "
                        "staged (interrupted staging, or loaded by another tool): unloading it")
            try:
                self.machine.unload()
            except Exception as exc:
                error = as_error(exc)
                log.error("reconcile: cannot unload the unrecorded kexec image: %s", error)
                with self.lock:
                    self.staged, self.record = None, None
                self.transition(state="failed", progress=idle(),
                                last_error=error_json(error))
                return
            self.record_history("unrecorded-unloaded", None, {})
        with self.lock:
            self.staged, self.record = None, None
        if memory is not None:
            memory.close()
        self.transition(state="failed" if failed else "idle", progress=idle())

    def _compute_can_relaunch(self) -> str:
        if self._kexec_core is False:
            return "na"        # this kernel cannot kexec at all
        if self.config.launch.require_drtm and self._capabilities.get("best") is None:
            return "na"
        return "yes" if self._state == "staged" and self.record is not None else "no"


# ------------------------------------------------------------------ helpers

def _staged_json(record: state.StagedRecord | None) -> dict:
    if record is None:
        return {}
    return {"id": record.id, "path": record.path, "method": record.method,
            "loader": record.loader, "kernel_sha256": record.kernel_sha256,
            "initrd_sha256": record.initrd_sha256 or "", "cmdline": record.cmdline,
            "staged_at": record.staged_at, "quiesce": copy.deepcopy(record.quiesce),
            # From a boot entry: which one, and what its signature covers.
            **({"entry": dict(record.entry), "signed": list(record.signed),
                "unsigned": list(record.unsigned)} if record.entry else {}),
            **({"dl_handler": dict(record.dl_handler)} if record.dl_handler else {})}
