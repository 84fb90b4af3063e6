"""Staging (engine layer): from a request to an image verified, loaded and recorded.

`Stager` builds the staging options from the request and the configuration
(`stage_request.stage_options`, the same code `relaunchctl stage --local` uses), then a
worker thread copies, verifies and loads (through the machine), records the staged image
and the quiesce plan, and ends in `staged`, `failed` or (cancelled) `idle`, undoing
whatever it did on the way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from relaunchd.engine import state
from relaunchd.engine.last_error import as_error, error_json
from relaunchd.engine.progress import idle, progress_of
from relaunchd.engine.relaunch import plan_summary
from relaunchd.engine.stage_request import (
    NEXT_BOOT,
    StageRequest,
    checked_entry,
    stage_options,
)
from relaunchd.errors import (
    Busy,
    InvalidArgument,
    KexecFailed,
    NotReady,
    NotStaged,
    RelaunchError,
    VerificationFailed,
)
from relaunchd.formats.boot_entries import TYPE2
from relaunchd.launch import entry_staging, registry, staging
from relaunchd.platform import quiesce
from relaunchd.platform.boot_entries import ListedEntry, staged_entry_matches

if TYPE_CHECKING:
    from relaunchd.engine.core import Engine

log = logging.getLogger("relaunchd.engine")

class Cancelled(BaseException):
    """Raised inside the staging worker when Cancel was requested; a BaseException so no
    `except Exception` on the way turns it into a failure."""


class Stager:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cancel = threading.Event()
        self._staging_entry: dict[str, Any] = {}    # the entry being staged (under lock)

    def stage(self, path: str, *, profile: int | None = None, method: str | None = None,
              cmdline: str | None = None, append: tuple[str, ...] | list[str] = (),
              loader: str | None = None, entry: str | None = None,
              if_auto_stage: bool = False) -> str:
        """Start staging `path`, or the boot loader entry `entry` (path ""); the relaunch
        id. `if_auto_stage` (the kernel-install plugin): only if the configuration's
        `auto_stage` is next-boot, else stage nothing and return ""."""
        engine = self.engine
        if if_auto_stage:
            if entry is None:
                raise InvalidArgument("if_auto_stage applies to staging a boot entry "
                                      f"(entry {NEXT_BOOT!r})")
            if engine.config.auto_stage != NEXT_BOOT:
                log.info("not staging boot entry %s: auto_stage is %s", entry,
                         engine.config.auto_stage)
                return ""
        engine.begin_operation()
        started = False
        try:
            current = engine.state
            if current not in ("idle", "staged", "failed"):
                raise Busy(f"cannot stage while {current}")
            if isinstance(append, str):
                raise InvalidArgument("append is a list of kernel arguments, not a string")
            request = StageRequest(path=path, profile=profile, method=method,
                                   cmdline=cmdline, append=tuple(append), loader=loader,
                                   entry=entry)
            options = self._options(request)
            listed = self._entry(entry, options) if entry is not None else None
            if listed is not None:            # history and logs name the entry's file
                path = listed.path(listed.entry.source) or listed.id
            if current == "staged":
                self.drop_staged("replaced by a new stage")
            self._cancel.clear()
            worker = threading.Thread(target=self._work, args=(path, options, listed),
                                      name="relaunchd-stage", daemon=True)
            with engine.lock:
                engine.worker = worker
                self._staging_entry = listed.staged_record() if listed is not None else {}
            engine.transition(state="staging", last_error={},
                              progress=progress_of("checking", 0, 0))
            log.info("staging %s%s as %s (method %s)", path,
                     f" (boot entry {listed.id})" if listed is not None else "",
                     options.relaunch_id, options.method)
            worker.start()
            started = True
            return options.relaunch_id
        finally:
            if not started:
                with engine.lock:
                    engine.worker = None
                engine.release_operation()

    def _entry(self, name: str, options: staging.StageOptions) -> ListedEntry:
        """The boot loader entry `name` names, checked before any work: it exists, the
        loader would show it, relaunchd can stage it, its unsigned parts are allowed, and
        a UKI lies where the image policy allows. Its signature is checked by staging, on
        the sealed copy (the listing does not hash anything here)."""
        config = self.engine.config
        listing = self.engine.machine.boot_entries(esp=config.boot_entries.esp,
                                                   xbootldr=config.boot_entries.xbootldr,
                                                   trusted=None)
        listed = checked_entry(config, listing, name)
        if listed.entry.type == TYPE2:
            self.engine.machine.check_location(entry_staging.uki_path(options.root, listed),
                                               options.policy)
        return listed

    def _options(self, request: StageRequest) -> staging.StageOptions:
        engine, config = self.engine, self.engine.config
        best = engine.capabilities.get("best")
        if (request.method or config.launch.method) == "auto" and best is None \
                and config.launch.require_drtm:
            caps = engine.capabilities
            why = "; ".join(f"{m}: {', '.join(caps[m]['reasons']) or 'unknown'}"
                            for m in registry.DRTM_NAMES if m in caps)
            raise NotReady(f"launch.require_drtm is set and no dynamic launch method is "
                           f"ready ({why}); see `relaunchctl check`")
        trusted = (engine.machine.trusted_certificates(config.trust.certificates)
                   if config.trust.certificates else [])
        if not trusted:
            raise VerificationFailed("no trusted certificates configured (trust.certificates "
                                     "in the configuration); refusing to stage")
        options = stage_options(config, request, best_method=best, trusted=trusted)
        if request.entry is None:
            # InvalidImage now, not from the worker.
            engine.machine.check_location(request.path, options.policy)
        return options

    def _work(self, path: str, options: staging.StageOptions,
              listed: ListedEntry | None = None) -> None:
        engine = self.engine
        staged = None
        loaded = False
        try:
            engine.set_progress("verifying", 0, 0, force=True)
            if listed is None:
                staged = engine.machine.prepare(path, options, self._on_progress)
            else:
                staged = engine.machine.prepare_entry(
                    listed, options,
                    allow_unsigned_parts=engine.config.trust.allow_unsigned_initrd,
                    progress=self._on_progress)
            self._check_cancel()
            engine.set_progress("loading", 0, 1, force=True)
            engine.machine.load(staged)
            loaded = True
            if engine.machine.kexec_loaded() is False:
                raise KexecFailed("the load returned, but the kernel reports no kexec image "
                                  "loaded")
            self._check_cancel()
            engine.set_progress("recording", 0, 1, force=True)
            digests = engine.machine.digests(staged, engine.config.measurement.banks)
            plan = engine.machine.quiesce_plan(
                quiesce.QuiescePolicy.from_config(engine.config.quiesce))
            # The shutdown hook executes this plan; it is reviewable before the relaunch.
            engine.store.save_runtime(state.QUIESCE_PLAN,
                                      {"id": staged.id, "plan": json.loads(plan.to_json())})
            record = dataclasses.replace(record_for(staged), digests=digests,
                                         quiesce=plan_summary(plan))
            if listed is not None:
                entry = listed.staged_record()
                record = dataclasses.replace(record, entry=entry, signed=entry["signed"],
                                             unsigned=entry["unsigned"])
            engine.store.save_staged(record)
            with engine.lock:
                # Cancel and this transition exclude each other under the lock:
                # either the cancel is seen here, or it finds the image staged.
                if self._cancel.is_set():
                    raise Cancelled
                engine.staged, engine.record = staged, record
                self._staging_entry = {}
                changed = engine.update(state="staged", progress=progress_of("staged", 1, 1, 100))
                engine.end_operation()
            engine.emit(changed)
            log.info("staged %s from %s (%s, %s loader)", record.id, path, record.method,
                     record.loader)
            engine.record_history("staged", record.id, {
                "path": record.path, "method": record.method,
                **({"entry": record.entry["id"]} if record.entry else {})})
        except Cancelled:
            self._abandon(staged, loaded)
            with engine.lock:
                self._staging_entry = {}
                changed = engine.update(state="idle", progress=idle())
                engine.end_operation()
            engine.emit(changed)
            log.info("staging %s cancelled", options.relaunch_id)
            engine.record_history("cancelled", options.relaunch_id, {"path": path})
        except BaseException as exc:   # the worker must end in a state, whatever happened
            error = as_error(exc)
            self._abandon(staged, loaded)
            if not isinstance(exc, RelaunchError):
                log.exception("staging %s failed unexpectedly", options.relaunch_id)
            else:
                log.warning("staging %s failed: %s: %s", options.relaunch_id, error.name, error)
            with engine.lock:
                self._staging_entry = {}
                changed = engine.update(state="failed", progress=idle(),
                                        last_error=error_json(error))
                engine.end_operation()
            engine.emit(changed)
            engine.record_history("stage-failed", options.relaunch_id,
                                  {"path": path, "error": error.name, "message": str(error)})
            if not isinstance(exc, Exception):
                raise

    def _abandon(self, staged: Any, loaded: bool) -> None:
        """Undo a stage that did not finish: nothing loaded, no record, no memfds."""
        engine = self.engine
        try:
            engine.store.clear_staged()
            engine.store.clear_runtime(state.QUIESCE_PLAN)
        except OSError as exc:
            log.error("cannot remove %s: %s", engine.store.staged_path, exc)
        try:
            if loaded or engine.machine.kexec_loaded():
                engine.machine.unload()
        except Exception:
            log.exception("unloading the abandoned kexec image failed")
        if staged is not None:
            staged.close()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled

    def _on_progress(self, step: str, done: int, total: int) -> None:
        self._check_cancel()     # cooperative cancel: between chunks of the one read pass
        self.engine.set_progress(step, done, total)

    def abort(self) -> None:
        """Ask a running stage to stop (the daemon is closing)."""
        with self.engine.lock:
            if self.engine.state == "staging":
                self._cancel.set()

    def cancel(self, *, if_entry: str | None = None, if_kernel: str | None = None) -> None:
        """Staging: request the abort and return (the worker unloads what it did and
        ends in idle; `wait()` to block). Staged: unload now, idle.

        `if_entry`/`if_kernel` (the kernel-install plugin, when it removes a kernel): only
        if what is staged (or being staged) came from that boot entry (id or
        kernel-install name) or runs that kernel release; otherwise NotStaged, and
        nothing changes."""
        engine = self.engine
        filtered = if_entry is not None or if_kernel is not None

        def matches(entry: dict[str, Any]) -> None:
            if filtered and not (entry and staged_entry_matches(entry, entry=if_entry,
                                                                kernel=if_kernel)):
                wanted = " or ".join(f"{what} {value!r}" for what, value in
                                     (("entry", if_entry), ("kernel", if_kernel)) if value)
                raise NotStaged(f"nothing from {wanted} is staged")

        with engine.lock:
            if engine.state == "staging":
                matches(self._staging_entry)
                if self._cancel.is_set():
                    return
                self._cancel.set()
                changed = engine.update(progress={**engine.progress, "step": "cancelling"})
            else:
                changed = None
        if changed is not None:
            engine.emit(changed)
            return
        engine.begin_operation()
        try:
            current = engine.state
            if current in ("quiescing", "relaunching"):
                raise Busy(f"a relaunch is under way (state {current}); it cannot be cancelled")
            if current != "staged":
                raise NotStaged("nothing is staged")
            matches(engine.record.entry if engine.record else {})
            record_id = engine.record.id if engine.record else None
            self.drop_staged("cancelled")
            engine.transition(state="idle", progress=idle())
            engine.record_history("unstaged", record_id, {"why": "cancelled"})
        finally:
            engine.release_operation()

    def drop_staged(self, why: str) -> None:
        """Unload the staged image, then forget it (held: op lock). An unload that fails
        leaves everything as it was and raises."""
        engine = self.engine
        engine.machine.unload()
        log.info("unloaded staged image %s (%s)", engine.record.id if engine.record else "?",
                 why)
        engine.store.clear_staged()
        engine.store.clear_runtime(state.QUIESCE_PLAN)
        with engine.lock:
            staged, engine.staged, engine.record = engine.staged, None, None
        if staged is not None:
            staged.close()


def record_for(staged: Any) -> state.StagedRecord:
    plan = staged.plan()
    return state.StagedRecord(
        id=staged.id, path=staged.source, method=staged.method, loader=staged.loader,
        kernel_sha256=staged.kernel.sha256,
        initrd_sha256=staged.initrd.sha256 if staged.initrd is not None else None,
        cmdline=staged.cmdline.text, staged_at=state.now(),
        predictions={"pcr11": plan.get("pcr11"), "pcr11_phases": plan.get("pcr11_phases"),
                     **({"drtm": plan["drtm"]} if plan.get("drtm") else {})})
