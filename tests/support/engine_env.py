"""An engine over `FakeMachine` in a tmp tree, for the engine tests in tests/unit/engine/:
configuration (state, runtime, one image directory, the `db` test certificate), the
notify calls it made, and the paths of its records."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from relaunchd.engine import state
from relaunchd.engine.config import Config, TrustConfig
from relaunchd.engine.core import Engine
from support.fakes import FakeMachine


@dataclass
class Notes:
    """The notify callback: every set of names and the State seen at each, from any thread."""

    calls: list[set[str]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    engine: Engine | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, names: set[str]) -> None:
        with self.lock:
            self.calls.append(set(names))
            if self.engine is not None and "state" in names:
                self.states.append(self.engine.state)


@dataclass
class EngineEnv:
    config: Config
    machine: FakeMachine
    notes: Notes
    images: Path

    @classmethod
    def create(cls, tmp: Path, cert: str, machine: FakeMachine | None = None) -> EngineEnv:
        images = tmp / "images"
        images.mkdir(mode=0o755)
        images.chmod(0o755)
        (tmp / "platform").mkdir()
        config = Config(root=str(tmp / "platform"), state_dir=str(tmp / "state"),
                        runtime_dir=str(tmp / "run"), image_dirs=(str(images),),
                        trust=TrustConfig(certificates=(cert,)))
        return cls(config, machine or FakeMachine(), Notes(), images)

    def image(self, name: str) -> str:
        """An image file the fake machine stages (it never parses it)."""
        path = self.images / name
        path.write_bytes(b"MZ not really a UKI; the fake machine never parses it")
        return str(path)

    def engine(self) -> Engine:
        engine = Engine(self.config, self.machine, notify=self.notes)
        self.notes.engine = engine
        return engine

    @property
    def staged_json(self) -> Path:
        return Path(self.config.runtime_dir) / state.STAGED

    @property
    def quiesce_plan_json(self) -> Path:
        return Path(self.config.runtime_dir) / state.QUIESCE_PLAN
