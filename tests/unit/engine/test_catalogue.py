"""The image catalogue (relaunchd.engine.catalogue): ListImages and Inspect over the
FakeMachine, whose catalogue steps are the real ones, and what the catalogue asks of the
machine (the configured directories, one policy, the configured trust and banks)."""

from __future__ import annotations

import json

import pytest

from relaunchd.engine.catalogue import Catalogue
from relaunchd.engine.config import Config, MeasurementConfig, TrustConfig
from relaunchd.errors import (
    InvalidImage,
)
from support.fakes import FakeMachine


def test_list_images_reports_invalid(env):
    engine = env.engine()
    (env.tmp / "images" / "notes.txt").write_text("ignored")
    images = [e for e in engine.list_images() if e["kind"] == "image"]
    assert len(images) == 1
    entry = images[0]
    assert entry["path"] == env.image and entry["size"] > 0 and "mtime" in entry
    assert "error" in entry
    json.dumps(images)


def test_inspect_invalid(env):
    with pytest.raises(InvalidImage):
        env.engine().inspect(env.image)


class Recorder(FakeMachine):
    """Records what the catalogue asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple] = []

    def find_images(self, directories):
        self.asked.append(("find", tuple(directories)))
        return super().find_images(directories)

    def describe_image(self, path, policy):
        self.asked.append(("describe", path, policy.allowed_dirs))
        return super().describe_image(path, policy)

    def trusted_certificates(self, paths):
        self.asked.append(("trust", tuple(paths)))
        return ["the certificate"]

    def inspect_image(self, path, *, profile, banks, trusted):
        self.asked.append(("inspect", path, profile, tuple(banks), tuple(trusted)))
        return {"path": path}


def config(tmp_path, **kw) -> Config:
    dirs = (tmp_path / "a", tmp_path / "b")
    for d in dirs:
        d.mkdir(mode=0o755)
    return Config(state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "run"),
                  image_dirs=tuple(str(d) for d in dirs), **kw)


def test_list_images_describes_what_the_machine_finds_in_the_configured_directories(tmp_path):
    cfg = config(tmp_path)
    for d, name in ((tmp_path / "b", "2.efi"), (tmp_path / "a", "1.efi")):
        (d / name).write_bytes(b"MZ")
    machine = Recorder()
    listed = [e for e in Catalogue(cfg, machine).list_images() if e["kind"] == "image"]
    assert [e["path"] for e in listed] == [str(tmp_path / "a/1.efi"), str(tmp_path / "b/2.efi")]
    assert machine.asked[0] == ("find", cfg.image_dirs)
    assert [a[0] for a in machine.asked[1:]] == ["describe", "describe"]
    assert all(a[2] == cfg.image_dirs for a in machine.asked[1:])    # the same policy


def test_inspect_uses_the_configured_trust_and_banks(tmp_path):
    cfg = config(tmp_path, trust=TrustConfig(certificates=("/etc/db.pem",)),
                 measurement=MeasurementConfig(banks=("sha384", "sha256")))
    machine = Recorder()
    assert Catalogue(cfg, machine).inspect("/anywhere/x.efi", 2) == {"path": "/anywhere/x.efi"}
    assert machine.asked == [("trust", ("/etc/db.pem",)),
                             ("inspect", "/anywhere/x.efi", 2, ("sha384", "sha256"),
                              ("the certificate",))]


def test_inspect_without_trust_loads_none(tmp_path):
    machine = Recorder()
    Catalogue(config(tmp_path), machine).inspect("/x.efi")
    assert [a[0] for a in machine.asked] == ["inspect"] and machine.asked[0][4] == ()
