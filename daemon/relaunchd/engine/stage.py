"""Staging (engine layer): from a request to an image verified, loaded and recorded.

`Stager` builds the staging options from the request and the configuration
(`stage_request.stage_options`, the same code `relaunchctl stage --local` uses), then a
worker thread copies, verifies and loads (through the machine), records the staged image
and the quiesce plan, and ends in `staged`, `failed` or (cancelled) `idle`, undoing
whatever it did on the way.

Replacing a staged image never loses it to a stage that fails (issue #14): the new image
is copied, verified, measured and planned in its own memfds while the old one stays loaded
and recorded (StagedImage shows it throughout); only then is the new one loaded — over the
old one, which the kernel replaces only once the new image is complete (kernel/kexec.c
do_kexec_load and kernel/kexec_file.c kexec_file_load end in `xchg(dest_image, image)`; a
load that fails leaves the loaded image as it was) — and recorded. If anything fails or
is cancelled, the old image is what stays staged: still loaded after a failed load, or
loaded again from its sealed memfds (kept open while staged) when the new one had already
replaced it. State is `staged` again, with LastError (`id` of the failed stage, `kept`)
and a `stage-failed` history entry saying so. Only when the old image cannot be loaded
again — its memfds are gone after a daemon restart, or the reload fails — is it lost:
nothing is left loaded, state `failed`, LastError `lost`. From the load until one image
is recorded again staged.json is absent, so a daemon killed then restarts with nothing
staged (reconcile unloads the unrecorded image) rather than with a record of the wrong one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
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

CANCEL_WAIT = 30.0    # seconds Cancel waits for a stopping stage (a kexec load takes ~1 s)

class Cancelled(BaseException):
    """Raised inside the staging worker when Cancel was requested; a BaseException so no
    `except Exception` on the way turns it into a failure."""


@dataclass(frozen=True)
class Previous:
    """The image staged when a replacement began; it stays staged until the new one is
    loaded and recorded."""

    record: state.StagedRecord
    memory: Any                    # its StagedImage (sealed memfds); None after a restart
    plan: dict[str, Any] | None    # its quiesce-plan.json


@dataclass(frozen=True)
class Outcome:
    """What became of the previous image after a replacement did not finish."""

    kept: bool
    note: str                      # for LastError and the log


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
            previous = None
            if current == "staged" and engine.record is not None:
                # Not dropped: it stays loaded and recorded until the new one replaces it.
                previous = Previous(engine.record, engine.staged,
                                    engine.store.load_runtime(state.QUIESCE_PLAN))
            self._cancel.clear()
            worker = threading.Thread(target=self._work, args=(path, options, previous, listed),
                                      name="relaunchd-stage", daemon=True)
            with engine.lock:
                engine.worker = worker
                self._staging_entry = listed.staged_record() if listed is not None else {}
            engine.transition(state="staging", last_error={},
                              progress=progress_of("checking", 0, 0))
            log.info("staging %s%s as %s (method %s%s)", path,
                     f" (boot entry {listed.id})" if listed is not None else "",
                     options.relaunch_id, options.method,
                     f"; {previous.record.id} stays staged until then" if previous else "")
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
              previous: Previous | None, listed: ListedEntry | None = None) -> None:
        engine = self.engine
        staged = None
        new_loaded = False          # the new image has (or may have) replaced what was loaded
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
            # Everything that can fail without touching the kernel comes first.
            digests = engine.machine.digests(staged, engine.config.measurement.banks)
            plan = engine.machine.quiesce_plan(
                quiesce.QuiescePolicy.from_config(engine.config.quiesce))
            record = dataclasses.replace(record_for(staged), digests=digests,
                                         quiesce=plan_summary(plan))
            if listed is not None:
                entry = listed.staged_record()
                record = dataclasses.replace(record, entry=entry, signed=entry["signed"],
                                             unsigned=entry["unsigned"])
            self._check_cancel()
            engine.set_progress("loading", 0, 1, force=True)
            if previous is not None:
                # From the load on, the kernel may hold the new image while staged.json
                # names the old one: a daemon killed in between must not find them
                # agreeing. Without a record, reconcile unloads whatever is loaded; the
                # old record is written again when the old image stays (_keep_previous).
                engine.store.clear_staged()
            try:
                engine.machine.load(staged)
                new_loaded = True
            except BaseException:
                # A load that fails replaces nothing; one that returned and then found
                # nothing loaded (staging.load's check) has replaced it with nothing.
                new_loaded = engine.machine.kexec_loaded() is not True
                raise
            if engine.machine.kexec_loaded() is False:
                raise KexecFailed("the load returned, but the kernel reports no kexec image "
                                  "loaded")
            self._check_cancel()
            engine.set_progress("recording", 0, 1, force=True)
            # The shutdown hook executes this plan; it is reviewable before the relaunch.
            engine.store.save_runtime(state.QUIESCE_PLAN,
                                      {"id": staged.id, "plan": json.loads(plan.to_json())})
            engine.store.save_staged(record)
            detail = {"path": record.path, "method": record.method,
                      **({"entry": record.entry["id"]} if record.entry else {}),
                      **({"replaced": previous.record.id} if previous else {})}
            # History before the final transition: once it is visible, the next operation
            # may start and must find its entry after this one.
            self._check_cancel()
            engine.record_history("staged", record.id, detail)
            with engine.lock:
                # Cancel and this transition exclude each other under the lock:
                # either the cancel is seen here, or it finds the image staged.
                if self._cancel.is_set():
                    raise Cancelled
                engine.staged, engine.record = staged, record
                if previous is not None and previous.memory is not None:
                    previous.memory.close()          # replaced for good: release its memfds
                self._staging_entry = {}
                changed = engine.update(state="staged", progress=progress_of("staged", 1, 1, 100))
                engine.end_operation()
            engine.emit(changed)
            log.info("staged %s from %s (%s, %s loader)%s", record.id, path, record.method,
                     record.loader, f", replacing {previous.record.id}" if previous else "")
        except Cancelled:
            outcome = self._undo(staged, new_loaded, previous)
            lost = {} if outcome is None or outcome.kept else {"last_error": {
                **error_json(RelaunchError(f"staging cancelled; {outcome.note}")),
                "id": options.relaunch_id, **_history_of(previous, outcome)}}
            log.info("staging %s cancelled%s", options.relaunch_id,
                     f"; {outcome.note}" if outcome else "")
            engine.record_history("cancelled", options.relaunch_id,
                                  {"path": path, **_history_of(previous, outcome)})
            with engine.lock:
                self._staging_entry = {}
                changed = engine.update(state=_state_after(previous, outcome,
                                                           "failed" if lost else "idle"),
                                        progress=_progress_after(previous, outcome), **lost)
                engine.end_operation()
            engine.emit(changed)
        except BaseException as exc:   # the worker must end in a state, whatever happened
            error = as_error(exc)
            outcome = self._undo(staged, new_loaded, previous)
            if not isinstance(exc, RelaunchError):
                log.exception("staging %s failed unexpectedly", options.relaunch_id)
            else:
                log.warning("staging %s failed: %s: %s", options.relaunch_id, error.name, error)
            message = str(error) + (f"; {outcome.note}" if outcome else "")
            shown = {**error_json(error, message), "id": options.relaunch_id,
                     **_history_of(previous, outcome)}
            engine.record_history("stage-failed", options.relaunch_id,
                                  {"path": path, "error": error.name, "message": message,
                                   **_history_of(previous, outcome)})
            with engine.lock:
                self._staging_entry = {}
                changed = engine.update(state=_state_after(previous, outcome, "failed"),
                                        progress=_progress_after(previous, outcome),
                                        last_error=shown)
                engine.end_operation()
            engine.emit(changed)
            if not isinstance(exc, Exception):
                raise

    def _undo(self, staged: Any, new_loaded: bool, previous: Previous | None) -> Outcome | None:
        """Undo a stage that did not finish; what became of the previous image, if any."""
        if previous is None:
            self._abandon(staged, new_loaded)
            return None
        if staged is not None:
            staged.close()
        return self._keep_previous(previous, new_loaded)

    def _keep_previous(self, previous: Previous, new_loaded: bool) -> Outcome:
        """Make the previous image the staged one again: loaded (reloaded from its memfds
        when the new one replaced it) and recorded (its staged.json and quiesce plan)."""
        engine, old = self.engine, previous.record.id
        reloaded = False
        try:
            if new_loaded:
                if previous.memory is None:
                    raise NotStaged("its memory copy did not survive the daemon's restart, so "
                                    "it cannot be loaded again")
                engine.machine.load(previous.memory)
                reloaded = True
            if engine.machine.kexec_loaded() is not True:
                raise KexecFailed("the kernel reports no kexec image loaded")
            if previous.plan is not None:
                engine.store.save_runtime(state.QUIESCE_PLAN, previous.plan)
            engine.store.save_staged(previous.record)
        except BaseException as exc:
            why = as_error(exc)
            log.error("the previously staged image %s is lost: %s", old, why)
            self._forget_previous(previous)
            return Outcome(False, f"the previously staged image {old} was lost too "
                                  f"({why.name}: {why})")
        how = " (loaded again from its sealed copy)" if reloaded else ""
        log.info("staged image %s stays staged%s", old, how)
        return Outcome(True, f"the staged image {old} stays staged{how}")

    def _forget_previous(self, previous: Previous) -> None:
        """Nothing can be proven loaded: leave nothing loaded and nothing recorded."""
        engine = self.engine
        try:
            if engine.machine.kexec_loaded() is not False:
                engine.machine.unload()
        except Exception:
            log.exception("unloading after a failed replacement failed")
        for clear in (engine.store.clear_staged,
                      lambda: engine.store.clear_runtime(state.QUIESCE_PLAN)):
            try:
                clear()
            except OSError as exc:
                log.error("cannot clean up after a failed replacement: %s", exc)
        with engine.lock:
            engine.staged, engine.record = None, None
        if previous.memory is not None:
            previous.memory.close()

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
        """Staging: stop it and return once the worker has undone what it did (State idle,
        or staged for an image staged before it); a worker held up in the kernel longer
        than CANCEL_WAIT leaves State `staging` with step `cancelling`, and it ends on its
        own. Staged: unload now, idle.

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
                first = not self._cancel.is_set()
                self._cancel.set()
                changed = engine.update(progress={**engine.progress, "step": "cancelling"}) \
                    if first else set()
            else:
                changed = None
        if changed is not None:
            engine.emit(changed)
            engine.wait(CANCEL_WAIT)     # the copy stops at its next chunk, a load returns
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


def _state_after(previous: Previous | None, outcome: Outcome | None, otherwise: str) -> str:
    return "staged" if previous is not None and outcome is not None and outcome.kept \
        else otherwise


def _progress_after(previous: Previous | None, outcome: Outcome | None) -> dict:
    kept = previous is not None and outcome is not None and outcome.kept
    return progress_of("staged", 1, 1, 100) if kept else idle()


def _history_of(previous: Previous | None, outcome: Outcome | None) -> dict[str, str]:
    """`kept` or `lost`: the id of the image that was staged before, for LastError and
    the history."""
    if previous is None or outcome is None:
        return {}
    return {"kept" if outcome.kept else "lost": previous.record.id}


def record_for(staged: Any) -> state.StagedRecord:
    plan = staged.plan()
    return state.StagedRecord(
        id=staged.id, path=staged.source, method=staged.method, loader=staged.loader,
        kernel_sha256=staged.kernel.sha256,
        initrd_sha256=staged.initrd.sha256 if staged.initrd is not None else None,
        cmdline=staged.cmdline.text, staged_at=state.now(),
        dl_handler={k: plan["dl_handler"][k] for k in ("path", "sha256")}
        if plan.get("dl_handler") else {},
        predictions={"pcr11": plan.get("pcr11"), "pcr11_phases": plan.get("pcr11_phases"),
                     **({"drtm": plan["drtm"]} if plan.get("drtm") else {})})
