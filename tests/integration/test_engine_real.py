"""The engine with the real staging on real UKIs, over the real HostMachine with its
host-changing steps faked (tests/support/dbus_fake_machine.py: load, unload, kexec_loaded,
quiesce, hand-off) on a platform fixture root: this host kernel has no kexec."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from fixtures.platforms.build import materialize
from relaunchd.engine.config import Config, TrustConfig
from relaunchd.engine.core import Engine
from support.dbus_fake_machine import HostMachineWithoutSideEffects


@pytest.fixture
def setup(tmp_path, real_ukis, keys):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    os.chmod(images, 0o755)
    for name in ("signed", "signed-twice", "multi", "tampered", "signed-other", "minimal"):
        shutil.copy(real_ukis[name], images / f"{name}.efi")
    # A machine where the kexec method is ready (and txt/skinit are not).
    root = materialize("intel-laptop-ptt", tmp_path)
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-1\n")
    (tmp_path / "run").mkdir()
    config = Config(root=str(root), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(images),),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),)))
    platform = HostMachineWithoutSideEffects(str(root), config.runtime_dir,
                                             probe_config=config.probe_config())
    names: list[set[str]] = []
    engine = Engine(config, platform, notify=names.append)
    yield engine, platform, images, config, names
    engine.close()


def open_fds() -> set[str]:
    """Our sealed memfds (relaunchd:*) only: other tests' threads may open and
    close unrelated descriptors meanwhile."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:relaunchd:"):
            found.add(f"{fd}:{target}")
    return found


def test_stage_signed_uki_and_relaunch(setup, debian_kernel):
    engine, platform, images, config, names = setup
    before = open_fds()
    relaunch_id = engine.stage(str(images / "signed.efi"))
    assert engine.wait(60) == "staged", engine.last_error
    image = engine.staged_image
    assert image["id"] == relaunch_id and image["method"] == "kexec"
    assert image["loader"] == "file"
    assert image["kernel_sha256"] == hashlib.sha256(
        debian_kernel.vmlinuz.read_bytes()).hexdigest()
    assert image["initrd_sha256"]
    assert image["cmdline"].endswith(f"relaunchd.id={relaunch_id}")
    record = json.loads((Path(config.runtime_dir) / "staged.json").read_text())
    assert record["kernel_sha256"] == image["kernel_sha256"]
    inspected = engine.inspect(str(images / "signed.efi"))
    assert record["predictions"]["pcr11"]["sha256"] == inspected["pcr11"]["sha256"]
    assert inspected["signature"]["verified"] is True
    assert any("progress" in n for n in names)
    assert len(open_fds() - before) == 3       # image, kernel, initrd memfds while staged
    engine.relaunch()
    assert platform.handoff_kinds() == ["systemd"] and engine.state == "relaunching"
    pending = json.loads((Path(config.state_dir) / "pending.json").read_text())
    assert pending["predictions"]["pcr11"]["sha256"] == inspected["pcr11"]["sha256"]
    assert pending["boot_id"] == "boot-1"


def test_restage_and_cancel_close_memfds(setup):
    engine, platform, images, _, _ = setup
    before = open_fds()
    engine.stage(str(images / "signed.efi"))
    assert engine.wait(60) == "staged"
    second = engine.stage(str(images / "signed-twice.efi"), append=["quiet"])
    assert engine.wait(60) == "staged", engine.last_error
    assert engine.staged_image["path"].endswith("signed-twice.efi")
    assert engine.staged_image["cmdline"].endswith(f"quiet relaunchd.id={second}")
    assert len(open_fds() - before) == 3       # the first image's memfds were closed
    engine.cancel()
    assert engine.state == "idle" and platform.kexec_loaded() is False
    assert open_fds() == before


@pytest.mark.parametrize(("name", "error"), [
    ("minimal", "VerificationFailed"),        # unsigned
    ("signed-other", "VerificationFailed"),   # signed by an untrusted key
    ("tampered", "VerificationFailed"),
])
def test_stage_rejected_leaves_nothing(setup, name, error):
    engine, platform, images, config, _ = setup
    before = open_fds()
    engine.stage(str(images / f"{name}.efi"))
    assert engine.wait(60) == "failed"
    assert engine.last_error["name"] == error
    assert platform.loads == [] and platform.kexec_loaded() is False
    assert not (Path(config.runtime_dir) / "staged.json").exists()
    assert open_fds() == before


def test_cancel_during_real_staging(setup):
    engine, platform, images, config, _ = setup
    entered, resume = threading.Event(), threading.Event()

    def hook(progress):
        def wrapped(step, done, total):
            entered.set()
            resume.wait(10)          # hold the verification pass until cancel was asked
            progress(step, done, total)
        return wrapped

    platform.progress_hook = hook
    before = open_fds()
    engine.stage(str(images / "signed.efi"))
    assert entered.wait(30)
    assert engine.state == "staging"
    engine.cancel()
    resume.set()
    assert engine.wait(60) == "idle"
    assert platform.loads == [] and platform.kexec_loaded() is False
    assert not (Path(config.runtime_dir) / "staged.json").exists()
    assert open_fds() == before
    assert engine.history()[-1]["event"] == "cancelled"


def test_list_images_real(setup):
    engine, _, images, _, _ = setup
    listed = {Path(e["path"]).name: e for e in engine.list_images() if e["kind"] == "image"}
    assert set(listed) == {"signed.efi", "signed-twice.efi", "multi.efi", "tampered.efi",
                           "signed-other.efi", "minimal.efi"}
    assert listed["signed.efi"]["signed"] is True
    assert listed["minimal.efi"]["signed"] is False
    assert listed["signed.efi"]["title"].startswith("Debian")
    assert listed["signed.efi"]["uname"]
    assert listed["multi.efi"]["profiles"] == 3
    assert not any("error" in e for e in listed.values())


def test_image_outside_allowed_dirs_refused(setup, real_ukis, tmp_path):
    engine, _, _, _, _ = setup
    from relaunchd.errors import InvalidImage

    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(real_ukis["signed"], other / "x.efi")
    with pytest.raises(InvalidImage, match="allowed image directory"):
        engine.stage(str(other / "x.efi"))
    assert engine.state == "idle"
