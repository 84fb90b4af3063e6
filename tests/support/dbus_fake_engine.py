"""A fake engine with the `relaunchd.engine.core.Engine` surface, for the D-Bus tests.

Run by `daemon_under_test.py fake-engine` (with tests/support on PYTHONPATH).
tests/integration/test_engine_contract.py holds it to the real engine: the same
properties and shapes, states, history (the real `StateStore`: newest first,
`{time, event, id, detail}`), `check()` (the real report format), the image catalogue and
Inspect (the real catalogue over the real machine's read-only steps), and the named
errors the bus maps (Busy, NotStaged, InvalidArgument, InvalidImage).

Where it differs from the real engine, by design:
- Staging does not verify or load: it reads and hashes the whole file in 1 MiB chunks (a
  100 MB stage keeps a thread busy like the real one), so the bus tests need no UKIs and
  no trust configuration. `kernel_sha256` is that whole-file digest, `initrd_sha256` is
  "", and the command line is the appended arguments plus `relaunchd.id=`.
- Readiness is a fixed report (kexec ready, txt and skinit not), so `can_relaunch` is never
  "na" and a relaunch never measures.
- Relaunch hands off nowhere: it replies, then goes quiescing → relaunching on a timer (the
  real engine is relaunching when it replies, quiescing only for --immediate); a failure
  comes after the reply and rolls back to staged with LastError, as the real engine's
  failed hand-off does. It never proves a relaunch (`last_relaunch` stays {}).
- Behaviour switches, by file name (so a test needs no side channel):
    *bad*            staging ends in VerificationFailed
    *failrelaunch*   Relaunch reaches quiescing, then fails with KexecFailed
    *slow*           Relaunch stays in quiescing for 3 s instead of 0.2 s
Config (YAML): image_dirs, state_dir, runtime_dir, root, chunk_delay (s per 1 MiB chunk).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import dataclass, field

import yaml

from relaunchd.engine import config as engine_config
from relaunchd.engine import relaunch as engine_relaunch
from relaunchd.engine import state as records
from relaunchd.engine.catalogue import Catalogue
from relaunchd.engine.core import METHODS, STATES
from relaunchd.engine.host_machine import HostMachine
from relaunchd.engine.last_error import error_json
from relaunchd.engine.progress import idle, progress_of
from relaunchd.engine.stage_request import LOADERS
from relaunchd.errors import (
    Busy,
    InvalidArgument,
    KexecFailed,
    NotStaged,
    RelaunchError,
    VerificationFailed,
)
from relaunchd.launch.assessment import Report
from relaunchd.launch.checks import Check, Verdict
from relaunchd.platform import image_files, quiesce
from relaunchd.platform.sysroot import Read

CHUNK = 1 << 20
VERSION = "0.1.0-fake"
RELAUNCH_STATES = ("quiescing", "relaunching")


@dataclass(frozen=True)
class Config:
    root: str = "/"
    state_dir: str = "/var/lib/relaunchd"
    runtime_dir: str = "/run/relaunchd"
    image_dirs: tuple[str, ...] = field(default_factory=tuple)
    chunk_delay: float = 0.0


def load_config(path: str) -> Config:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    known = set(Config.__dataclass_fields__)
    for key in data:
        if key not in known:
            raise RelaunchError(f"{path}: unknown key {key!r}")
    data["image_dirs"] = tuple(data.get("image_dirs", ()))
    return Config(**data)


def readiness(root: str) -> Report:
    """The fixed report: a VM with a TPM, kexec ready; one unreadable fact (its value is
    left out on the bus, its error is not)."""
    verdicts = {
        "txt": Verdict("txt", (Check("cpu-no-smx", False, "the CPU has no SMX (no smx flag)",
                                     "use a TXT-capable CPU, on bare metal"),)),
        "skinit": Verdict("skinit", (Check("cpu-not-amd", False, "CPU vendor is GenuineIntel",
                                           "use a launch method of this CPU vendor"),)),
        "kexec": Verdict("kexec", (Check("kexec-supported", True, "kexec_file_load available"),
                                   Check("tpm-2.0", True, "TPM 2.0 present"))),
    }
    facts = {
        "kexec.support": Read("/sys/kernel/kexec_loaded",
                              {"kexec_core": True, "kexec_file_load": True}),
        "tpm.version": Read("/sys/class/tpm/tpm0/tpm_version_major", 2),
        "iommu.units": Read("/sys/class/iommu", error="not-present"),
    }
    return Report(root, facts, verdicts)


class Engine:
    def __init__(self, config: Config, *, notify=lambda names: None) -> None:
        self.config = config
        self._notify = notify
        self._lock = threading.Lock()
        self._state = "idle"
        self._progress: dict = idle()
        self._staged: dict = {}
        self._last_error: dict = {}
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.store = records.StateStore(config.state_dir, config.runtime_dir)
        self._report = readiness(config.root)
        # The real catalogue over the real machine's read-only steps (listing, parsing).
        self._catalogue = Catalogue(
            engine_config.Config(root=config.root, state_dir=config.state_dir,
                                 runtime_dir=config.runtime_dir,
                                 image_dirs=tuple(config.image_dirs)),
            HostMachine())
        self.version = VERSION

    # properties (read from the main loop: never block on long work)
    @property
    def state(self) -> str:
        return self._state

    @property
    def progress(self) -> dict:
        return dict(self._progress)

    @property
    def staged_image(self) -> dict:
        return dict(self._staged)

    @property
    def capabilities(self) -> dict:
        caps: dict = {m: {"ready": v.ready, "reasons": [c.id for c in v.reasons]}
                      for m, v in self._report.verdicts.items()}
        caps["best"] = self._report.best
        caps["volumes"] = []            # no /etc/crypttab volume sealed to the TPM
        return caps

    @property
    def can_relaunch(self) -> str:
        return "yes" if self._state == "staged" else "no"

    @property
    def last_relaunch(self) -> dict:
        return {}          # this engine never proves a relaunch

    @property
    def last_error(self) -> dict:
        return dict(self._last_error)

    def _set(self, **changes) -> None:
        names = set()
        for attr, prop in (("state", "state"), ("progress", "progress"),
                           ("staged", "staged_image"), ("last_error", "last_error")):
            if attr in changes:
                assert attr != "state" or changes[attr] in STATES, changes[attr]
                setattr(self, "_" + attr, changes[attr])
                names.add(prop)
        if "state" in changes or "staged" in changes:
            names.add("can_relaunch")
        self._notify(names)

    def _record(self, event: str, ident: str | None, detail: dict) -> None:
        self.store.append_history(records.HistoryEntry(time=records.now(), event=event,
                                                       id=ident, detail=detail))

    # methods
    def check(self, method=None) -> dict:
        if method is not None and method not in METHODS:
            raise InvalidArgument(f"unknown launch method {method!r} "
                                  f"(one of {', '.join(METHODS)})")
        result = self._report.to_json()
        result["method"] = method or "auto"
        result["ready"] = (self._report.best is not None if result["method"] == "auto"
                           else self._report.verdicts[method].ready)
        return result

    def list_images(self) -> list[dict]:
        with self._lock:
            staged = self._staged.get("path") if self._state == "staged" else None
        return self._catalogue.list_images(staged_path=staged)

    def inspect(self, path: str, profile=None) -> dict:
        return self._catalogue.inspect(path, profile)

    def stage(self, path, *, profile=None, method=None, cmdline=None, append=(), loader=None):
        with self._lock:
            if self._state not in ("idle", "staged", "failed"):
                raise Busy(f"cannot stage while {self._state}")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidArgument(f"the image path must be absolute, not {path!r}")
            if method is not None and method not in METHODS:
                raise InvalidArgument(f"unknown launch method {method!r}")
            if loader not in LOADERS:
                raise InvalidArgument(f"unknown loader {loader!r} (file or segments)")
            if profile is not None and (isinstance(profile, bool) or profile < 0):
                raise InvalidArgument(f"profile must be a number ≥ 0, not {profile!r}")
            if isinstance(append, str):
                raise InvalidArgument("append is a list of kernel arguments, not a string")
            image_files.check_location(path, image_files.ImagePolicy(self.config.image_dirs))
            size = os.stat(path).st_size
            ident = str(uuid.uuid4())
            chosen = self._report.best if method in (None, "auto") else method
            self._cancel.clear()
            self._set(state="staging", progress=progress_of("verifying", 0, size),
                      last_error={}, staged={})
            self._thread = threading.Thread(
                target=self._work,
                args=(ident, path, size, list(append), chosen, loader or "file"), daemon=True)
            self._thread.start()
            return ident

    def _work(self, ident, path, size, append, method, loader) -> None:
        digest = hashlib.sha256()
        done = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if self._cancel.is_set():
                        self._set(state="idle", progress=idle())
                        self._record("cancelled", ident, {"path": path})
                        return
                    digest.update(chunk)
                    done += len(chunk)
                    self._set(progress=progress_of("verifying", done, size))
                    if self.config.chunk_delay:
                        self._cancel.wait(self.config.chunk_delay)
            if "bad" in os.path.basename(path):
                raise VerificationFailed(f"{path}: signature does not verify")
            staged = {"id": ident, "path": path, "method": method, "loader": loader,
                      "kernel_sha256": digest.hexdigest(), "initrd_sha256": "",
                      "cmdline": " ".join([*append, f"relaunchd.id={ident}"]),
                      "staged_at": records.now(),
                      # as the real one: the quiesce plan's summary (this engine plans none)
                      "quiesce": {"offline_cpus": [], "devices": [], "holders": [],
                                  "kept_cpus": [], "notes": [], "uninspected": 0}}
            self._set(state="staged", staged=staged, progress=progress_of("staged", 1, 1, 100))
            self._record("staged", ident, {"path": path, "method": method})
        except RelaunchError as exc:
            self._set(state="failed", progress=idle(),
                      last_error={**error_json(exc), "id": ident})
            self._record("stage-failed", ident,
                         {"path": path, "error": exc.name, "message": str(exc)})

    def wait(self, timeout=None) -> str:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._state

    def cancel(self) -> None:
        """As the real engine: a stage in progress is asked to stop and ends in idle soon
        after (this call does not wait); a staged image is dropped at once."""
        with self._lock:
            if self._state == "staging":
                self._cancel.set()
                self._set(progress={**self._progress, "step": "cancelling"})
                return
            if self._state in RELAUNCH_STATES:
                raise Busy(f"a relaunch is under way (state {self._state}); it cannot be "
                           "cancelled")
            if self._state != "staged":
                raise NotStaged("nothing is staged")
            ident = self._staged.get("id")
            self._set(state="idle", staged={}, progress=idle())
            self._record("unstaged", ident, {"why": "cancelled"})

    def _relaunchable(self) -> dict:
        if self._state in ("staging", *RELAUNCH_STATES):
            raise Busy(f"another operation is running (state {self._state})")
        if self._state != "staged":
            raise NotStaged(f"no staged image (state {self._state})")
        return self._staged

    def relaunch(self, *, force=False, immediate=False, fallback=None) -> str:
        with self._lock:
            if fallback not in (None, "none", "reboot"):
                raise InvalidArgument(f"unknown fallback {fallback!r}")
            if fallback == "reboot" and self._state != "staged":
                # As the real engine: no relaunch possible → a recorded firmware reboot.
                ident = str(uuid.uuid4())
                err = NotStaged(f"nothing is staged (state {self._state})")
                self._record("relaunch-fallback", ident,
                             {"reason": f"{err.name}: {err}", "error": err.name})
                self._set(state="relaunching", last_error=error_json(err),
                          progress=progress_of("rebooting", 0, 1, 0))
                return ident
            staged = self._relaunchable()
            ident = staged["id"]
            self._set(state="quiescing", last_error={})
            if "failrelaunch" in staged["path"]:
                threading.Timer(0.2, self._fail_relaunch, args=(ident,)).start()
            else:
                delay = 3.0 if "slow" in os.path.basename(staged["path"]) else 0.2
                threading.Timer(delay, self._relaunching).start()
            self._record("relaunch-started", ident, {
                "handoff": "immediate" if immediate else "systemd", "force": force,
                "method": staged["method"], "measured": False, "overridden": []})
            return ident

    def rehearse(self) -> dict:
        with self._lock:
            ident = self._relaunchable()["id"]
            self._set(state="quiescing", last_error={})
            result = engine_relaunch.rehearsal_json(quiesce.RehearsalReport(
                [], True, True, [], quiesce.RollbackReport()))
            self._set(state="staged", progress=progress_of("staged", 1, 1, 100))
            self._record("rehearsed", ident, {"ok": result["ok"], "executed": 0,
                                              "mismatches": []})
            return result

    def _relaunching(self) -> None:
        self._set(state="relaunching", progress=progress_of("handed off", 3, 3, 100))

    def _fail_relaunch(self, ident) -> None:
        # As the real engine after a failed hand-off: back to staged, LastError set.
        err = KexecFailed("kexec hand-off failed: ENOSYS (fake)")
        self._record("relaunch-failed", ident,
                     {"error": err.name, "message": str(err), "handoff": "systemd"})
        self._set(state="staged", progress=progress_of("staged", 1, 1, 100),
                  last_error=error_json(err))

    def history(self, limit=50) -> list[dict]:
        """Past events, newest first (as the real engine reads its StateStore)."""
        if limit < 0:
            raise InvalidArgument("limit must not be negative")
        return [e.to_json() for e in reversed(self.store.history(limit))]

    def reconcile(self) -> None:
        pass

    def close(self) -> None:
        self._cancel.set()
