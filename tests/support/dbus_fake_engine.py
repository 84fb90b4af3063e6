"""A fake engine with the `relaunchd.engine.Engine` surface, for the D-Bus tests.

Run by `daemon_under_test.py fake-engine`
(with tests/support on PYTHONPATH). It does real work where the bus tests need it to —
staging reads and hashes the whole file in chunks, so a 100 MB stage keeps a thread
busy like the real one — and fakes everything that would touch the host: nothing is
loaded, nothing is handed off.

Behaviour switches, by file name (so a test needs no side channel):
  *bad*            staging ends in VerificationFailed
  *failrelaunch*   Relaunch reaches quiescing, then fails with KexecFailed
  *slow*           Relaunch stays in quiescing for 3 s instead of 0.2 s
Config (YAML): image_dirs, state_dir, runtime_dir, root, chunk_delay (s per 1 MiB chunk).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import yaml

from relaunchd.errors import (
    Busy,
    InvalidArgument,
    InvalidImage,
    KexecFailed,
    NotStaged,
    RelaunchError,
    VerificationFailed,
)

CHUNK = 1 << 20


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


class Engine:
    def __init__(self, config: Config, *, platform=None, notify=lambda names: None) -> None:
        self.config = config
        self._notify = notify
        self._lock = threading.Lock()
        self._state = "idle"
        self._progress: dict = {}
        self._staged: dict = {}
        self._last_error: dict = {}
        self._history: list[dict] = []
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.version = "0.1.0-fake"
        self.capabilities = {"kexec_file_load": True, "drtm": "none", "tpm": False,
                             "methods": ["kexec"], "lockdown": {"mode": "none"}}

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
                setattr(self, "_" + attr, changes[attr])
                names.add(prop)
        if "state" in changes or "staged" in changes:
            names.add("can_relaunch")
        self._notify(names)

    # methods
    def check(self, method=None) -> dict:
        time.sleep(0.05)
        return {"method": method or "kexec", "ready": True,
                "checks": [{"name": "kexec_file_load", "ok": True, "detail": None},
                           {"name": "tpm", "ok": False, "detail": "no TPM"}],
                "score": 1.5, "big": 1 << 63}

    def list_images(self) -> list[dict]:
        images = []
        for directory in self.config.image_dirs:
            for name in sorted(os.listdir(directory)):
                if name.endswith(".efi"):
                    path = os.path.join(directory, name)
                    images.append({"path": path, "size": os.path.getsize(path),
                                   "staged": self._staged.get("path") == path})
        return images

    def inspect(self, path: str, profile=None) -> dict:
        size = self._check_path(path)
        if profile is not None and profile > 3:
            raise InvalidArgument(f"profile {profile} does not exist")
        return {"path": path, "size": size, "profile": profile,
                "sections": [".linux", ".initrd"], "osrel": {"ID": "debian"}}

    def _check_path(self, path: str) -> int:
        if not any(path.startswith(d.rstrip("/") + "/") for d in self.config.image_dirs):
            raise InvalidImage(f"{path}: not inside an allowed image directory")
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise InvalidImage(f"{path}: no such file") from None

    def stage(self, path, *, profile=None, method=None, cmdline=None, append=(), loader=None):
        with self._lock:
            if self._state in ("staging", "quiescing", "relaunching"):
                raise Busy(f"an operation is in progress ({self._state})")
            size = self._check_path(path)
            ident = str(uuid.uuid4())
            self._cancel.clear()
            self._set(state="staging", progress={"step": "copy", "done": 0, "total": size},
                      last_error={})
            self._thread = threading.Thread(
                target=self._work, args=(ident, path, size, list(append), method), daemon=True)
            self._thread.start()
            return ident

    def _work(self, ident, path, size, append, method) -> None:
        digest = hashlib.sha256()
        done = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if self._cancel.is_set():
                        return
                    digest.update(chunk)
                    done += len(chunk)
                    self._set(progress={"step": "copy", "done": done, "total": size})
                    if self.config.chunk_delay:
                        time.sleep(self.config.chunk_delay)
            if "bad" in os.path.basename(path):
                raise VerificationFailed(f"{path}: signature does not verify")
            staged = {"id": ident, "path": path, "sha256": digest.hexdigest(), "size": size,
                      "append": append, "method": method or "kexec"}
            self._set(state="staged", staged=staged, progress={})
        except RelaunchError as exc:
            self._set(state="failed", progress={},
                      last_error={"name": exc.name, "message": str(exc), "id": ident})

    def wait(self, timeout=None) -> str:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._state

    def cancel(self) -> None:
        with self._lock:
            if self._state == "staging":
                self._cancel.set()
                if self._thread:
                    self._thread.join()
            elif self._state not in ("staged", "failed"):
                raise NotStaged(f"nothing to cancel ({self._state})")
            self._set(state="idle", staged={}, progress={})

    def relaunch(self, *, force=False, immediate=False, fallback=None) -> str:
        with self._lock:
            if fallback not in (None, "none", "reboot"):
                raise InvalidArgument(f"unknown fallback {fallback!r}")
            if self._state != "staged" and fallback == "reboot":
                # As the real engine: no relaunch possible → a recorded firmware reboot.
                ident = str(uuid.uuid4())
                self._record("relaunch-fallback", ident,
                             {"reason": f"NotStaged: nothing is staged ({self._state})"})
                self._set(state="relaunching")
                return ident
            if self._state != "staged":
                raise NotStaged(f"no staged image ({self._state})")
            ident = self._staged["id"]
            self._set(state="quiescing")
            if "failrelaunch" in self._staged["path"]:
                threading.Timer(0.2, self._fail_relaunch, args=(ident,)).start()
            else:
                delay = 3.0 if "slow" in os.path.basename(self._staged["path"]) else 0.2
                threading.Timer(delay, self._relaunching, args=(ident,)).start()
            self._record("relaunch-started", ident,
                         {"path": self._staged["path"], "force": force})
            return ident

    def _relaunching(self, _ident) -> None:
        self._set(state="relaunching")

    def _fail_relaunch(self, ident) -> None:
        err = KexecFailed("kexec hand-off failed: ENOSYS (fake)")
        self._record("relaunch-failed", ident, {"error": err.name, "message": str(err)})
        self._set(state="failed", last_error={"name": err.name, "message": str(err),
                                              "id": ident})

    def _record(self, event: str, ident: str, detail: dict) -> None:
        """As the real engine's history: {time, event, id, detail}, newest first."""
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._history.insert(0, {"time": stamp, "event": event, "id": ident,
                                 "detail": detail})

    def history(self, limit=50) -> list[dict]:
        return [dict(h) for h in self._history[:limit]]

    def reconcile(self) -> None:
        pass

    def close(self) -> None:
        self._cancel.set()
