"""The engine's unit-test environment: a `Config` under a tmp directory, the in-memory
`FakeMachine`, a notify recorder, and helpers that drive the engine to a state
(staged, relaunched, booted again). The `env` fixture of tests/unit/engine/conftest.py and
tests/unit/test_prometheus.py build it with `make_env`."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from relaunchd.engine import core, state
from relaunchd.engine.config import Config, TrustConfig
from relaunchd.engine.core import Engine
from support.fakes import FakeMachine

PROPERTIES = set(core.PROPERTIES)


class Recorder:
    """The notify callback: every set of names, from any thread."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.states: list[str] = []

    def __call__(self, names: set[str]) -> None:
        with self.lock:
            self.calls.append(set(names))
            if self.engine is not None and "state" in names:
                self.states.append(self.engine.state)   # reading inside notify must work

    def all(self) -> set[str]:
        return set().union(*self.calls) if self.calls else set()

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if name in c)


@dataclass
class Env:
    config: Config
    machine: FakeMachine
    notes: Recorder
    image: str
    tmp: Path

    def engine(self, **kw) -> Engine:
        engine = Engine(self.config, self.machine, notify=self.notes, **kw)
        self.notes.engine = engine
        return engine

    @property
    def staged_json(self) -> Path:
        return Path(self.config.runtime_dir) / state.STAGED

    @property
    def pending_json(self) -> Path:
        return Path(self.config.state_dir) / state.PENDING


def make_config(tmp: Path, cert: str | None, **kw) -> Config:
    return Config(root=str(tmp / "platform"), state_dir=str(tmp / "state"),
                  runtime_dir=str(tmp / "run"), image_dirs=(str(tmp / "images"),),
                  trust=TrustConfig(certificates=(cert,) if cert else ()), **kw)


def make_env(tmp_path: Path, cert: str) -> Env:
    """An engine environment under `tmp_path`: one image file (never parsed: the fake
    machine stages it), an empty platform root, trust in `cert`."""
    (tmp_path / "images").mkdir(mode=0o755)
    (tmp_path / "images").chmod(0o755)          # whatever the umask: the image rules check it
    image = tmp_path / "images" / "linux.efi"
    image.write_bytes(b"MZ not really a UKI; the fake platform never parses it")
    (tmp_path / "platform").mkdir()
    return Env(make_config(tmp_path, cert), FakeMachine(), Recorder(), str(image), tmp_path)


def staged_engine(env: Env) -> tuple[Engine, str]:
    engine = env.engine()
    relaunch_id = engine.stage(env.image)
    assert engine.wait(5) == "staged"
    return engine, relaunch_id


def write_record(env: Env, relaunch_id: str = "old-id") -> None:
    store = state.StateStore(env.config.state_dir, env.config.runtime_dir)
    store.save_staged(state.StagedRecord(
        id=relaunch_id, path=env.image, method="kexec", loader="file",
        kernel_sha256="aa" * 32, initrd_sha256=None, cmdline="x", staged_at=state.now()))


def relaunched(env: Env, **pending_changes) -> None:
    """An engine relaunches (fake hand-off), then the machine 'boots' into facts."""
    engine, _ = staged_engine(env)
    engine.relaunch()
    engine.close()
    if pending_changes:
        data = json.loads(env.pending_json.read_text())
        data.update(pending_changes)
        env.pending_json.write_text(json.dumps(data))
    new_boot(env)
    env.machine.calls.clear()


def new_boot(env: Env) -> None:
    """What a reboot does to the fakes: new boot id, /run emptied, no kexec image."""
    env.machine.boot = "new-boot"
    for path in Path(env.config.runtime_dir).iterdir():
        path.unlink()
    env.machine.loaded = False


# An engine environment with several named images (tests/unit/engine/test_stage.py,
# test_core.py): `make_env`'s, with images made on demand by name.
@dataclass
class EngineEnv(Env):
    @classmethod
    def create(cls, tmp: Path, cert: str, machine: FakeMachine | None = None) -> EngineEnv:
        env = make_env(tmp, cert)
        return cls(env.config, machine or env.machine, env.notes, env.image, tmp)

    def make_image(self, name: str) -> str:
        """An image file the fake machine stages (it never parses it)."""
        path = Path(self.config.image_dirs[0]) / name
        path.write_bytes(b"MZ not really a UKI; the fake machine never parses it")
        return str(path)

    @property
    def quiesce_plan_json(self) -> Path:
        return Path(self.config.runtime_dir) / state.QUIESCE_PLAN
