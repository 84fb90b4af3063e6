"""The relaunch state machine (engine layer): the whole behaviour, no bus.

States: idle → staging → staged → (quiescing →) relaunching, plus failed.
Adapters (D-Bus, CLI) call the methods and read the properties; every
property is JSON-able, and `notify` is told the D-Bus names of the ones that
changed, from whatever thread changed them.

Rules the code keeps:
- one mutating operation at a time (`_op_lock`); a second one gets Busy;
- long work (copy, hash, verify, load) runs in a worker thread; the caller
  gets the relaunch id at once and follows State/Progress;
- "staged" only ever means "recorded in staged.json *and* loaded in the
  kernel": every path that fails or is cancelled unloads and removes the
  record, and `reconcile` repairs the two after a crash;
- a relaunch writes pending.json before the hand-off and removes it again if
  the hand-off fails, so nothing is left half-done.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from relaunchd import __version__
from relaunchd.engine import relaunch as steps
from relaunchd.engine import state
from relaunchd.engine.config import Config
from relaunchd.engine.journal_ids import MESSAGE_IDS
from relaunchd.engine.machine import Platform, probe_config_for
from relaunchd.errors import (
    Busy,
    InvalidArgument,
    InvalidImage,
    KexecFailed,
    NotReady,
    NotStaged,
    QuiesceFailed,
    RelaunchAborted,
    RelaunchError,
    VerificationFailed,
)
from relaunchd.launch import assessment, registry, staging
from relaunchd.platform import image_files, quiesce
from relaunchd.platform.sysroot import SysRoot

__all__ = ["Engine", "Platform", "probe_config_for"]

log = logging.getLogger("relaunchd.engine")

STATES = ("idle", "staging", "staged", "quiescing", "relaunching", "failed")
METHODS = ("auto", *registry.NAMES)
PROGRESS_INTERVAL = 0.1          # at most 10 Progress notifications per second
IDLE_PROGRESS = {"step": "", "done": 0, "total": 0, "percent": 0}
# Overall percent per step: verification dominates (it reads the whole image).
STEP_SPAN = {"checking": (0, 1), "unloading": (1, 2), "verifying": (2, 92),
             "loading": (92, 98), "recording": (98, 100)}
BOOT_ID = "/proc/sys/kernel/random/boot_id"
UKI_SUFFIX = ".efi"


class _Cancelled(BaseException):
    """Raised inside the staging worker when Cancel was requested; a
    BaseException so no `except Exception` on the way turns it into a failure."""


class Engine:
    def __init__(self, config: Config, *, platform: Platform | None = None,
                 notify: Callable[[set[str]], None] = lambda names: None) -> None:
        self._config = config
        self._root = SysRoot(config.root)
        self._platform = platform if platform is not None else Platform.for_config(config)
        self._notify = notify
        self._store = state.StateStore(config.state_dir, config.runtime_dir)
        self._op_lock = threading.Lock()      # held for the whole of one mutating operation
        self._lock = threading.RLock()        # guards the fields below; never held over I/O
        self._done = threading.Condition(self._lock)
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._state = "idle"
        self._progress: dict[str, Any] = dict(IDLE_PROGRESS)
        self._progress_sent = 0.0
        self._record: state.StagedRecord | None = None
        self._staged: Any = None              # the StagedImage (memfds) while staged
        self._capabilities: dict[str, Any] = {}
        self._derived_seen: dict[str, Any] = {}   # derived properties as last notified
        self._kexec_core: bool | None = None
        self._last_error: dict[str, Any] = {}
        self._last_relaunch: dict[str, Any] = {}
        self._can_relaunch = "no"
        self._closed = False
        self._metrics_seen: tuple | None = None
        try:
            self._refresh_capabilities()
        except Exception:
            # A probe that cannot run must not keep the service down: report
            # nothing ready; Check() will try again and raise the error.
            log.exception("probing the platform failed")
        self._last_relaunch = self._store.load_last_relaunch()
        self._conclude_pending()
        self.reconcile()
        self._write_metrics()

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    @property
    def staged_image(self) -> dict:
        with self._lock:
            staged = self._state in ("staged", "quiescing", "relaunching")
            return _staged_json(self._record) if staged else {}

    @property
    def capabilities(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._capabilities)

    @property
    def can_relaunch(self) -> str:
        with self._lock:
            return self._can_relaunch

    @property
    def last_relaunch(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._last_relaunch)

    @property
    def last_error(self) -> dict:
        with self._lock:
            return dict(self._last_error)

    @property
    def version(self) -> str:
        return __version__

    # ------------------------------------------------------------ queries

    def check(self, method: str | None = None) -> dict:
        """A fresh probe, as `relaunchctl check --json` prints it, plus
        `method`/`ready` for the method asked about (auto: the engine's choice)."""
        if method is not None and method not in METHODS:
            raise InvalidArgument(f"unknown launch method {method!r} "
                                  f"(one of {', '.join(METHODS)})")
        report = self._refresh_capabilities()
        result = report.to_json()
        chosen = method or "auto"
        result["method"] = chosen
        result["ready"] = (self.capabilities["best"] is not None if chosen == "auto"
                           else report.verdicts[chosen].ready)
        return result

    def list_images(self) -> list[dict]:
        """UKIs in the image directories (and their EFI/Linux, where boot
        loaders keep type #2 entries). Cheap: headers and small sections only."""
        seen: set[str] = set()
        images: list[dict] = []
        for base in self._config.image_dirs:
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
                    if real in seen:
                        continue
                    seen.add(real)
                    images.append(self._describe_image(path))
        return images

    def inspect(self, path: str, profile: int | None = None) -> dict:
        """The full report of one image (`relaunchctl inspect --json`). The
        adapter authorizes the caller: this reads any path root can read."""
        from relaunchd.formats import image_report

        with image_files.open_image(path) as image:
            report = image_report.inspect_image(image, profile=profile,
                                              banks=self._config.measurement.banks,
                                              trusted=self._trusted())
        return report.to_json()

    def history(self, limit: int = 50) -> list[dict]:
        if limit < 0:
            raise InvalidArgument("limit must not be negative")
        return [e.to_json() for e in self._store.history(limit)]

    def wait(self, timeout: float | None = None) -> str:
        """Until no operation runs (tests, CLI); returns the state."""
        with self._done:
            self._done.wait_for(lambda: self._worker is None, timeout)
            return self._state

    # ------------------------------------------------------------ stage

    def stage(self, path: str, *, profile: int | None = None, method: str | None = None,
              cmdline: str | None = None, append: tuple[str, ...] | list[str] = (),
              loader: str | None = None) -> str:
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")
        started = False
        try:
            current = self.state
            if current not in ("idle", "staged", "failed"):
                raise Busy(f"cannot stage while {current}")
            options = self._stage_options(path, profile, method, cmdline, append, loader)
            if current == "staged":
                self._drop_staged("replaced by a new stage")
            self._cancel.clear()
            worker = threading.Thread(target=self._stage_worker, args=(path, options),
                                      name="relaunchd-stage", daemon=True)
            with self._lock:
                self._worker = worker
            changed = self._set(state="staging", last_error={},
                                progress=_progress("checking", 0, 0))
            self._emit(changed)
            log.info("staging %s as %s (method %s)", path, options.relaunch_id, options.method)
            worker.start()
            started = True
            return options.relaunch_id
        finally:
            if not started:
                with self._lock:
                    self._worker = None
                self._op_lock.release()

    def _stage_options(self, path: str, profile: int | None, method: str | None,
                       cmdline: str | None, append: Any, loader: str | None
                       ) -> staging.StageOptions:
        """Everything that can be refused before any work: arguments, method,
        trust, where the image lives."""
        cfg = self._config
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument(f"the image path must be absolute, not {path!r}")
        if profile is not None and (not isinstance(profile, int) or isinstance(profile, bool)
                                    or profile < 0):
            raise InvalidArgument(f"profile must be a number ≥ 0, not {profile!r}")
        if isinstance(append, str):
            raise InvalidArgument("append is a list of kernel arguments, not a string")
        chosen = method or cfg.launch.method
        if chosen not in METHODS:
            raise InvalidArgument(f"unknown launch method {chosen!r} "
                                  f"(one of {', '.join(METHODS)})")
        if chosen == "auto":
            chosen = self._auto_method()
        if cfg.launch.require_drtm and not registry.is_drtm(chosen):
            raise NotReady(f"launch.require_drtm is set, and the {chosen} method has no "
                           "dynamic launch")
        loader = loader if loader is not None else cfg.launch.loader
        if loader not in (None, "file", "segments"):
            raise InvalidArgument(f"unknown loader {loader!r} (file or segments)")
        trusted = self._trusted()
        if not trusted:
            raise VerificationFailed("no trusted certificates configured (trust.certificates "
                                     "in the configuration); refusing to stage")
        policy = image_files.ImagePolicy(tuple(cfg.image_dirs))
        image_files.check_location(path, policy)          # InvalidImage now, not from the worker
        options = staging.StageOptions(
            method=chosen, profile=profile, custom_cmdline=cmdline,
            append=[*cfg.cmdline.append, *append], trusted=trusted, policy=policy,
            relaunch_id=str(uuid.uuid4()), add_id_argument=cfg.cmdline.id_argument,
            banks=tuple(cfg.measurement.banks), root=self._root, loader=loader,
            probe_config=probe_config_for(cfg), sinit_acm=cfg.txt.sinit_acm)
        return options

    def _auto_method(self) -> str:
        best = self.capabilities.get("best")
        if best is not None:
            return best
        if self._config.launch.require_drtm:
            caps = self.capabilities
            why = "; ".join(f"{m}: {', '.join(caps[m]['reasons']) or 'unknown'}"
                            for m in registry.DRTM_NAMES if m in caps)
            raise NotReady(f"launch.require_drtm is set and no dynamic launch method is "
                           f"ready ({why}); see `relaunchctl check`")
        # Measured kexec needs nothing the probe can promise (a missing TPM only
        # means no measurement); the load itself is the real test.
        return "kexec"

    def _trusted(self) -> list:
        paths = self._config.trust.certificates
        if not paths:
            return []
        from relaunchd.platform.trust_store import load_certificates

        return load_certificates(paths)

    def _stage_worker(self, path: str, options: staging.StageOptions) -> None:
        staged = None
        loaded = False
        try:
            self._set_progress("verifying", 0, 0, force=True)
            # Fakes that only have the contract's methods get the real staging.
            prepare = getattr(self._platform, "prepare", staging.prepare)
            staged = prepare(path, options, self._on_progress)
            self._check_cancel()
            self._set_progress("loading", 0, 1, force=True)
            self._platform.load(staged)
            loaded = True
            if self._platform.kexec_loaded() is False:
                raise KexecFailed("the load returned, but the kernel reports no kexec image "
                                  "loaded")
            self._check_cancel()
            self._set_progress("recording", 0, 1, force=True)
            digests = self._platform.digests(staged, self._config.measurement.banks)
            plan = self._platform.quiesce_plan(
                quiesce.QuiescePolicy.from_config(self._config.quiesce))
            # The shutdown hook executes this plan; it is reviewable before the relaunch.
            self._store.save_runtime(state.QUIESCE_PLAN,
                                     {"id": staged.id, "plan": json.loads(plan.to_json())})
            record = dataclasses.replace(_record_for(staged), digests=digests,
                                         quiesce=steps.plan_summary(plan))
            self._store.save_staged(record)
            with self._lock:
                # Cancel and this transition exclude each other under the lock:
                # either the cancel is seen here, or it finds the image staged.
                if self._cancel.is_set():
                    raise _Cancelled
                self._staged, self._record = staged, record
                changed = self._set(state="staged", progress=_progress("staged", 1, 1, 100))
                self._end_operation()
            self._emit(changed)
            log.info("staged %s from %s (%s, %s loader)", record.id, path, record.method,
                     record.loader)
            self._history("staged", record.id, {"path": path, "method": record.method})
        except _Cancelled:
            self._abandon(staged, loaded)
            with self._lock:
                changed = self._set(state="idle", progress=dict(IDLE_PROGRESS))
                self._end_operation()
            self._emit(changed)
            log.info("staging %s cancelled", options.relaunch_id)
            self._history("cancelled", options.relaunch_id, {"path": path})
        except BaseException as exc:   # the worker must end in a state, whatever happened
            error = _as_error(exc)
            self._abandon(staged, loaded)
            if not isinstance(exc, RelaunchError):
                log.exception("staging %s failed unexpectedly", options.relaunch_id)
            else:
                log.warning("staging %s failed: %s: %s", options.relaunch_id, error.name, error)
            with self._lock:
                changed = self._set(state="failed", progress=dict(IDLE_PROGRESS),
                                    last_error=_error_json(error))
                self._end_operation()
            self._emit(changed)
            self._history("stage-failed", options.relaunch_id,
                          {"path": path, "error": error.name, "message": str(error)})
            if not isinstance(exc, Exception):
                raise

    def _abandon(self, staged: Any, loaded: bool) -> None:
        """Undo a stage that did not finish: nothing loaded, no record, no memfds."""
        try:
            self._store.clear_staged()
            self._store.clear_runtime(state.QUIESCE_PLAN)
        except OSError as exc:
            log.error("cannot remove %s: %s", self._store.staged_path, exc)
        try:
            if loaded or self._platform.kexec_loaded():
                self._platform.unload()
        except Exception:
            log.exception("unloading the abandoned kexec image failed")
        if staged is not None:
            staged.close()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _on_progress(self, step: str, done: int, total: int) -> None:
        self._check_cancel()     # cooperative cancel: between chunks of the one read pass
        self._set_progress(step, done, total)

    def _end_operation(self) -> None:
        """Under self._lock: the worker's final transition and the op lock's
        release are one step, so nobody sees a final state while still Busy."""
        self._worker = None
        self._op_lock.release()
        self._done.notify_all()

    # ------------------------------------------------------------ cancel

    def cancel(self) -> None:
        """Staging: request the abort and return (the worker unloads what it
        did and ends in idle; `wait()` to block). Staged: unload now, idle."""
        with self._lock:
            if self._state == "staging":
                if not self._cancel.is_set():
                    self._cancel.set()
                    changed = self._set(progress={**self._progress, "step": "cancelling"})
                else:
                    changed = set()
            else:
                changed = None
        if changed is not None:
            self._emit(changed)
            return
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")
        try:
            current = self.state
            if current in ("quiescing", "relaunching"):
                raise Busy(f"a relaunch is under way (state {current}); it cannot be cancelled")
            if current != "staged":
                raise NotStaged("nothing is staged")
            record_id = self._record.id if self._record else None
            self._drop_staged("cancelled")
            self._emit(self._set(state="idle", progress=dict(IDLE_PROGRESS)))
            self._history("unstaged", record_id, {"why": "cancelled"})
        finally:
            self._op_lock.release()

    def _drop_staged(self, why: str) -> None:
        """Unload the staged image, then forget it (held: op lock). An unload
        that fails leaves everything as it was and raises."""
        self._platform.unload()
        log.info("unloaded staged image %s (%s)", self._record.id if self._record else "?", why)
        self._store.clear_staged()
        self._store.clear_runtime(state.QUIESCE_PLAN)
        with self._lock:
            staged, self._staged, self._record = self._staged, None, None
        if staged is not None:
            staged.close()

    # ------------------------------------------------------------ relaunch

    def relaunch(self, *, force: bool = False, immediate: bool = False) -> str:
        """Measure, then hand the staged image to systemd (its shutdown hook quiesces),
        or with `immediate` quiesce here and jump. Returns the relaunch id. On failure
        everything is as before: staged, no pending record, LastError set, the error
        raised; a measurement already extended stays in the log (it replays)."""
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")
        try:
            record = self._relaunchable()
            self._refresh_capabilities()
            overridden = steps.readiness(self._config, self._platform, record,
                                         self.capabilities, force=force)
            kind = "immediate" if immediate else "systemd"
            plan = self._quiesce_plan(record) if immediate else None
            pending = state.PendingRecord(
                id=record.id, time=state.now(), path=record.path, method=record.method,
                loader=record.loader, kernel_sha256=record.kernel_sha256,
                initrd_sha256=record.initrd_sha256, cmdline=record.cmdline, handoff=kind,
                boot_id=self._boot_id(), force=force, predictions=record.predictions or {},
                handoff_at=time.time())
            # Written first: a daemon killed from here on is found out at its next start.
            self._store.save_pending(pending)
            self._emit(self._set(state="relaunching", last_error={},
                                 progress=_progress("measuring", 0, 3, 0)))
            quiesced = False
            try:
                measurement = steps.measure(self._config, self._platform, record)
                pending = dataclasses.replace(pending, measurement=measurement,
                                              handoff_at=time.time())
                self._store.save_pending(pending)
                self._history("relaunch-started", record.id, {
                    "handoff": kind, "force": force, "method": record.method,
                    "measured": measurement["measured"], "overridden": overridden})
                log.warning("relaunch %s: handing off (%s, %s)", record.id, kind,
                            "measured" if measurement["measured"] else "NOT measured",
                            extra={"MESSAGE_ID": MESSAGE_IDS["relaunch"],
                                   "RELAUNCH_ID": record.id})
                if plan is not None:
                    self._emit(self._set(state="quiescing",
                                         progress=_progress("quiescing", 1, 3, 40)))
                    quiesced = True
                    self._platform.quiesce(plan, self._journal_path())
                    self._emit(self._set(state="relaunching",
                                         progress=_progress("handing off", 2, 3, 80)))
                else:
                    self._store.save_runtime(state.HANDOFF, {"id": record.id})
                    self._emit(self._set(progress=_progress("handing off", 2, 3, 80)))
                pending = dataclasses.replace(pending, handoff_at=time.time())
                self._store.save_pending(pending)
                self._platform.handoff(kind)
            except BaseException as exc:
                self._handoff_failed(record, kind, exc, quiesced)
                if isinstance(exc, RelaunchError):
                    raise
                raise _as_error(exc) from exc
            log.info("relaunch %s handed off (%s)", record.id, kind)
            self._emit(self._set(progress=_progress("handed off", 3, 3, 100)))
            return record.id
        finally:
            self._op_lock.release()

    def rehearse(self) -> dict:
        """Quiesce the live system as the staged relaunch would, check, roll back, check
        again. The report; QuiesceFailed (rolled back) when a step fails."""
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")
        try:
            record = self._relaunchable()
            plan = self._quiesce_plan(record)
            self._emit(self._set(state="quiescing", last_error={},
                                 progress=_progress("rehearsing", 0, 1, 0)))
            try:
                report = self._platform.rehearse(plan, self._journal_path())
            except BaseException as exc:
                error = _as_error(exc)
                self._emit(self._set(state="staged", progress=_progress("staged", 1, 1, 100),
                                     last_error=_error_json(error)))
                self._history("rehearsal-failed", record.id,
                              {"error": error.name, "message": str(error)})
                raise error from exc
            result = _rehearsal_json(report)
            self._emit(self._set(state="staged", progress=_progress("staged", 1, 1, 100)))
            self._history("rehearsed", record.id, {
                "ok": result["ok"], "executed": len(result["executed"]),
                "mismatches": result["mismatches"]})
            log.info("relaunch %s rehearsed: %s", record.id,
                     "ok" if result["ok"] else "; ".join(result["mismatches"]) or "failed")
            return result
        finally:
            self._op_lock.release()

    def _relaunchable(self) -> state.StagedRecord:
        """The staged record, if it is staged and loaded (held: op lock)."""
        with self._lock:
            current, record = self._state, self._record
        if current != "staged" or record is None:
            raise NotStaged(f"nothing is staged (state {current})")
        loaded = self._platform.kexec_loaded()
        if loaded is not True:
            self._reconcile_locked()     # the record was stale: say so in State too
            raise NotReady("the kernel reports no kexec image loaded "
                           f"(/sys/kernel/kexec_loaded: {_tristate(loaded)}); stage again")
        return record

    def _quiesce_plan(self, record: state.StagedRecord) -> quiesce.QuiescePlan:
        saved = self._store.load_runtime(state.QUIESCE_PLAN)
        if saved is None or saved.get("id") != record.id:
            raise NotReady(f"no quiesce plan for {record.id} in {self._config.runtime_dir}; "
                           "stage again")
        try:
            return quiesce.QuiescePlan.from_json(json.dumps(saved.get("plan")))
        except InvalidArgument as exc:
            raise NotReady(f"the quiesce plan of {record.id} is unusable: {exc}; "
                           "stage again") from exc

    def _journal_path(self) -> str:
        return self._store.runtime_path(state.QUIESCE_JOURNAL)

    def _handoff_failed(self, record: state.StagedRecord, kind: str, exc: BaseException,
                        quiesced: bool) -> None:
        """Undo a relaunch that did not get away: roll back a quiesce, forget the
        pending record and the hook's marker, back to staged with LastError."""
        error = _as_error(exc)
        notes = []
        if quiesced and not isinstance(exc, QuiesceFailed):   # QuiesceFailed rolled back
            try:
                rolled = self._platform.rollback(self._journal_path())
                if not rolled.ok:
                    notes.append("ROLLBACK INCOMPLETE: " + "; ".join(rolled.failed))
            except Exception as rb:
                notes.append(f"ROLLBACK FAILED: {rb}")
        for clear in (self._store.clear_pending,
                      lambda: self._store.clear_runtime(state.HANDOFF)):
            try:
                clear()
            except OSError as os_exc:
                notes.append(f"cannot clean up: {os_exc}")
        message = str(error) + ("; " + "; ".join(notes) if notes else "")
        shown = {"name": error.name, "message": message, "time": state.now()}
        self._emit(self._set(state="staged", progress=_progress("staged", 1, 1, 100),
                             last_error=shown))
        log.warning("relaunch %s: %s hand-off failed: %s", record.id, kind, message)
        self._history("relaunch-failed", record.id,
                      {"error": error.name, "message": message, "handoff": kind})

    # ------------------------------------------------------------ after the new boot

    def _conclude_pending(self) -> None:
        """At start: a pending relaunch either led to this boot (prove it) or never got
        away (the daemon was killed or systemd did not go through with it)."""
        pending = self._store.load_pending()
        if pending is None:
            return
        boot_id = self._boot_id()
        if pending.boot_id is not None and boot_id == pending.boot_id:
            dropped = steps.recover_measurement(self._config, self._platform, pending) \
                if pending.measurement.get("measured") is not False else 0
            rolled = None
            if pending.handoff == "immediate":
                try:
                    rolled = self._platform.rollback(self._journal_path())
                except Exception as exc:
                    log.error("cannot roll back the quiesce of relaunch %s: %s", pending.id,
                              exc)
            self._store.clear_pending()
            self._store.clear_runtime(state.HANDOFF)
            why = (f"relaunch {pending.id} did not happen: relaunchd restarted in the boot "
                   "that requested it (killed before the hand-off, or the shutdown was "
                   "cancelled)")
            if dropped:
                why += f"; {dropped} measurement records that never reached the TPM were cut"
            error = RelaunchAborted(why)
            with self._lock:
                self._last_error = _error_json(error)
            log.error("%s", why, extra={"MESSAGE_ID": MESSAGE_IDS["failure"],
                                        "RELAUNCH_ID": pending.id})
            self._history("relaunch-aborted", pending.id, {
                "why": why, "log_records_dropped": dropped,
                "restored": rolled.restored if rolled is not None else []})
            return
        try:
            result = steps.conclude(self._config, self._platform, pending)
        except Exception as exc:      # never keep the service down over the proof
            log.exception("proving relaunch %s failed", pending.id)
            result = {"id": pending.id, "image": pending.path, "method": pending.method,
                      "time": pending.time, "verified": False, "measured": False,
                      "drtm": False, "downtime_ms": None,
                      "mismatches": [f"the proof could not run: {exc}"]}
        self._store.save_last_relaunch(result)
        self._store.clear_pending()
        with self._lock:
            self._last_relaunch = result
        verified = bool(result.get("verified"))
        self._history("relaunch-verified" if verified else "relaunch-unverified", pending.id,
                      {"mismatches": result.get("mismatches", []),
                       "downtime_ms": result.get("downtime_ms"),
                       "measured": result.get("measured")})
        fields = {"MESSAGE_ID": MESSAGE_IDS["verified" if verified else "unverified"],
                  "RELAUNCH_ID": pending.id}
        if verified:
            log.info("relaunch %s verified: running the staged image (%s, %s, %s ms)",
                     pending.id, pending.method,
                     "measured" if result.get("measured") else "not measured",
                     result.get("downtime_ms"), extra=fields)
        else:
            log.error("relaunch %s NOT VERIFIED: %s", pending.id,
                      "; ".join(result.get("mismatches", [])), extra=fields)

    def _boot_id(self) -> str | None:
        read = self._root.read_line(BOOT_ID)
        return read.value.strip() if read.ok and read.value else None

    # ------------------------------------------------------------ reconcile / close

    def reconcile(self) -> None:
        """Make State agree with staged.json and /sys/kernel/kexec_loaded:
        never "staged" for an image that is not loaded, nor the reverse."""
        if not self._op_lock.acquire(blocking=False):
            raise Busy(f"another operation is running (state {self.state})")
        try:
            if self.state in ("quiescing", "relaunching"):
                raise Busy(f"a relaunch is under way (state {self.state})")
            self._reconcile_locked()
        finally:
            self._op_lock.release()

    def _reconcile_locked(self) -> None:
        record = self._store.load_staged()
        loaded = self._platform.kexec_loaded()
        with self._lock:
            memory, failed = self._staged, self._state == "failed"
        if memory is not None and (record is None or record.id != memory.id):
            memory.close()     # the memfds of an image no longer staged
            memory = None
        if record is not None and loaded is True:
            with self._lock:
                self._staged, self._record = memory, record
                changed = self._set(state="staged", progress=_progress("staged", 1, 1, 100))
            self._emit(changed)
            log.info("reconcile: %s is staged and loaded", record.id)
            return
        if record is not None:
            log.warning("reconcile: staged record %s, but no kexec image is loaded "
                        "(kexec_loaded: %s; unloaded by someone else?): forgetting it",
                        record.id, _tristate(loaded))
            self._store.clear_staged()
            self._history("staged-lost", record.id, {"kexec_loaded": loaded})
        elif loaded is True:
            log.warning("reconcile: a kexec image is loaded but nothing is recorded as "
                        "staged (interrupted staging, or loaded by another tool): unloading it")
            try:
                self._platform.unload()
            except Exception as exc:
                error = _as_error(exc)
                log.error("reconcile: cannot unload the unrecorded kexec image: %s", error)
                with self._lock:
                    self._staged, self._record = None, None
                    changed = self._set(state="failed", progress=dict(IDLE_PROGRESS),
                                        last_error=_error_json(error))
                self._emit(changed)
                return
            self._history("unrecorded-unloaded", None, {})
        with self._lock:
            self._staged, self._record = None, None
            changed = self._set(state="failed" if failed else "idle",
                                progress=dict(IDLE_PROGRESS))
        if memory is not None:
            memory.close()
        self._emit(changed)

    def close(self) -> None:
        """Stop: abort a running stage, release the memfds. A staged image
        stays loaded (and recorded) for the next daemon to find."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._state == "staging":
                self._cancel.set()
        self.wait(timeout=60)
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            staged.close()

    # ------------------------------------------------------------ internals

    def _describe_image(self, path: str) -> dict:

        entry: dict[str, Any] = {"path": path}
        try:
            st = os.stat(path, follow_symlinks=False)
            entry.update(size=st.st_size, mtime=int(st.st_mtime))
            with image_files.open_image(path) as image:
                resolved = image.resolve(None)
                osrel = image.os_release(resolved)
                entry.update(
                    title=osrel.get("PRETTY_NAME") or osrel.get("NAME") or "",
                    uname=image.uname(resolved) or "",
                    signed=bool(image.headers.cert_table_size),
                    profiles=len(image.profiles))
            policy = image_files.ImagePolicy(tuple(self._config.image_dirs))
            image_files.check_location(path, policy)
        except (InvalidImage, InvalidArgument, OSError) as exc:
            entry["error"] = str(exc)
        return entry

    def _refresh_capabilities(self) -> assessment.Report:
        report = self._platform.probe()
        caps: dict[str, Any] = {
            m: {"ready": v.ready, "reasons": [c.id for c in v.reasons]}
            for m, v in report.verdicts.items()}
        ready = [m for m in registry.NAMES if caps.get(m, {}).get("ready")]
        if self._config.launch.require_drtm:
            ready = [m for m in ready if registry.is_drtm(m)]
        configured = self._config.launch.method
        caps["best"] = (ready[0] if ready else None) if configured == "auto" else (
            configured if configured in ready else None)
        support = report.facts.get("kexec.support")
        core = support.value.get("kexec_core") if support is not None and support.ok \
            and isinstance(support.value, dict) else None
        with self._lock:
            self._capabilities = caps
            self._kexec_core = core
            changed = self._set()
        self._emit(changed)
        return report

    def _set(self, **fields: Any) -> set[str]:
        """Update fields under the lock; the D-Bus names of what changed."""
        names = {"state": "State", "progress": "Progress", "last_error": "LastError"}
        with self._lock:
            changed = set()
            for key, value in fields.items():
                if getattr(self, f"_{key}") != value:
                    setattr(self, f"_{key}", value)
                    changed.add(names[key])
            # Properties derived from fields others may have set directly
            # (_record, _capabilities): compared with what was last announced.
            self._can_relaunch = self._compute_can_relaunch()
            derived = {"StagedImage": self.staged_image, "CanRelaunch": self._can_relaunch,
                       "Capabilities": copy.deepcopy(self._capabilities)}
            changed |= {name for name, value in derived.items()
                        if self._derived_seen.get(name) != value}
            self._derived_seen = derived
            if "Progress" in changed:
                self._progress_sent = time.monotonic()
            return changed

    def _compute_can_relaunch(self) -> str:
        if self._kexec_core is False:
            return "na"        # this kernel cannot kexec at all
        if self._config.launch.require_drtm and self._capabilities.get("best") is None:
            return "na"
        return "yes" if self._state == "staged" and self._record is not None else "no"

    def _set_progress(self, step: str, done: int, total: int, *, force: bool = False) -> None:
        """Progress is always current; notifications at most every 100 ms."""
        now = time.monotonic()
        with self._lock:
            value = _progress(step, done, total)
            if value == self._progress:
                return
            self._progress = value
            if not force and now - self._progress_sent < PROGRESS_INTERVAL:
                return
            self._progress_sent = now
        self._emit({"Progress"})

    def _emit(self, names: set[str]) -> None:
        if not names:
            return
        if names & {"State", "StagedImage", "LastRelaunch"}:
            self._write_metrics()
        try:
            self._notify(set(names))
        except Exception:
            log.exception("property-change callback failed")

    def _write_metrics(self) -> None:
        with self._lock:
            current = (self._state, self._record is not None,
                       self._last_relaunch.get("id"), self._last_relaunch.get("verified"))
            if current == self._metrics_seen:
                return
            self._metrics_seen = current
            last = copy.deepcopy(self._last_relaunch)
        steps.write_metrics(self._config, self._store, state=current[0], staged=current[1],
                            last_relaunch=last)

    def _history(self, event: str, relaunch_id: str | None, detail: dict) -> None:
        try:
            self._store.append_history(state.HistoryEntry(time=state.now(), event=event,
                                                          id=relaunch_id, detail=detail))
        except OSError as exc:
            log.error("cannot append to %s: %s", self._store.history_path, exc)


# ------------------------------------------------------------------ helpers

def _progress(step: str, done: int, total: int, percent: int | None = None) -> dict:
    if percent is None:
        low, high = STEP_SPAN.get(step, (0, 0))
        fraction = done / total if total > 0 else 0.0
        percent = int(low + (high - low) * min(1.0, fraction))
    return {"step": step, "done": int(done), "total": int(total), "percent": int(percent)}


def _record_for(staged: Any) -> state.StagedRecord:
    plan = staged.plan()
    return state.StagedRecord(
        id=staged.id, path=staged.source, method=staged.method, loader=staged.loader,
        kernel_sha256=staged.kernel.sha256,
        initrd_sha256=staged.initrd.sha256 if staged.initrd is not None else None,
        cmdline=staged.cmdline.text, staged_at=state.now(),
        predictions={"pcr11": plan.get("pcr11"), "pcr11_phases": plan.get("pcr11_phases"),
                     **({"drtm": plan["drtm"]} if plan.get("drtm") else {})})


def _staged_json(record: state.StagedRecord | None) -> dict:
    if record is None:
        return {}
    return {"id": record.id, "path": record.path, "method": record.method,
            "loader": record.loader, "kernel_sha256": record.kernel_sha256,
            "initrd_sha256": record.initrd_sha256 or "", "cmdline": record.cmdline,
            "staged_at": record.staged_at}


def _rehearsal_json(report: quiesce.RehearsalReport) -> dict:
    return {"ok": report.ok, "quiesced_ok": report.quiesced_ok,
            "restored_ok": report.restored_ok, "mismatches": list(report.mismatches),
            "executed": [{"action": e.action, "target": e.target, "previous": e.previous}
                         for e in report.executed],
            "rollback": {"restored": list(report.rollback.restored),
                         "already": list(report.rollback.already),
                         "failed": list(report.rollback.failed),
                         "notes": list(report.rollback.notes)}}


def _as_error(exc: BaseException) -> RelaunchError:
    if isinstance(exc, RelaunchError):
        return exc
    if isinstance(exc, OSError):
        return RelaunchError(f"{exc.strerror or exc}" + (f": {exc.filename}"
                                                        if exc.filename else ""))
    return RelaunchError(f"internal error: {type(exc).__name__}: {exc}")


def _error_json(error: RelaunchError) -> dict:
    return {"name": error.name, "message": str(error), "time": state.now()}


def _tristate(value: bool | None) -> str:
    return {True: "1", False: "0", None: "unreadable"}[value]
