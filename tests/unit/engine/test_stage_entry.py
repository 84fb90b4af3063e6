"""Staging a boot loader entry through the engine (`Stage` with `entry`, `if_auto_stage`;
`Cancel` with `if_entry`/`if_kernel`; boot entries in `ListImages`), over FakeMachine
whose listing is the real one, of a small ESP built here: the engine picks what
systemd-boot 252 would boot, refuses before any work what cannot be staged, records the
entry and what its signature covers, and cancels only what came from a removed kernel."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from relaunchd.engine import state
from relaunchd.engine.config import BootEntriesConfig, Config, TrustConfig
from relaunchd.engine.core import Engine
from relaunchd.errors import (
    InvalidArgument,
    InvalidBootEntry,
    InvalidImage,
    NoBootEntry,
    NotStaged,
    VerificationFailed,
)
from support import bootfixtures, ukibuild
from support.fakes import FakeMachine

TOKEN = "0123456789abcdef0123456789abcdef"
NEWER = f"{TOKEN}-6.1.0-15-amd64"        # kernel-install's TOKEN-KVER of each entry
OLDER = f"{TOKEN}-6.1.0-13-amd64"
UKI = "debian-uki.efi"


def type1(esp: Path, kver: str, *, options: str = "root=/dev/vda ro", extra: str = "") -> str:
    """An entry as kernel-install's 90-loaderentry.install writes it."""
    directory = esp / TOKEN / kver
    directory.mkdir(parents=True)
    (directory / "linux").write_bytes(b"MZ stand-in kernel")
    (directory / "initrd.img").write_bytes(b"initrd")
    name = f"{TOKEN}-{kver}.conf"
    (esp / "loader" / "entries" / name).write_text(
        f"title Debian GNU/Linux 12 (bookworm)\nversion {kver}\nmachine-id {TOKEN}\n"
        f"sort-key debian\noptions {options}\nlinux /{TOKEN}/{kver}/linux\n"
        f"initrd /{TOKEN}/{kver}/initrd.img\n{extra}")
    return name


@dataclasses.dataclass
class Env:
    tmp: Path
    root: Path
    esp: Path
    config: Config
    machine: FakeMachine

    def engine(self, **changes) -> Engine:
        return Engine(dataclasses.replace(self.config, **changes), self.machine)

    def staged(self, engine: Engine, **kw) -> dict:
        engine.stage("", **kw)
        assert engine.wait(5) == "staged", engine.last_error
        return engine.staged_image


@pytest.fixture
def env(tmp_path, keys) -> Env:
    root = tmp_path / "root"
    esp = root / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    type1(esp, "6.1.0-13-amd64")
    type1(esp, "6.1.0-15-amd64", options="root=/dev/vda ro quiet")
    bootfixtures.build_uki({"osrel": "ID=aaa\nPRETTY_NAME=UKI\nVERSION_ID=1\n",
                            "cmdline": "root=/dev/vda uki", "uname": "6.1.0-20-amd64"},
                           esp / "EFI" / "Linux" / UKI)
    machine = FakeMachine()
    machine.boot_root = str(root)
    config = Config(root=str(root), state_dir=str(tmp_path / "state"),
                    runtime_dir=str(tmp_path / "run"), image_dirs=(str(esp),),
                    boot_entries=BootEntriesConfig(esp="/efi"),
                    trust=TrustConfig(certificates=(str(keys["db"].cert),),
                                      allow_unsigned_initrd=True))
    return Env(tmp_path, root, esp, config, machine)


def test_next_boot_is_the_loaders_first_entry_and_the_record_names_it(env):
    # Sort key "aaa" < "debian": the UKI is first; then the newer kernel.
    (env.esp / "EFI" / "Linux" / UKI).unlink()
    engine = env.engine()
    image = env.staged(engine, entry="next-boot", append=("quiet",))
    name = f"{NEWER}.conf"
    assert env.machine.calls[0] == ("prepare_entry", name)
    assert env.machine.entry_options == [{"allow_unsigned_parts": True}]
    assert image["path"] == f"/efi/loader/entries/{name}"
    assert image["entry"]["id"] == name and image["entry"]["stem"] == NEWER
    assert image["entry"]["type"] == "type1" and image["entry"]["version"] == "6.1.0-15-amd64"
    assert image["entry"]["kernel"] == f"/efi/{TOKEN}/6.1.0-15-amd64/linux"
    assert image["signed"] == ["kernel"] and image["unsigned"] == ["initrd", "options"]
    # The staged command line is the entry's options plus what staging adds.
    relaunch_id = image["id"]
    assert image["cmdline"] == f"root=/dev/vda ro quiet quiet relaunchd.id={relaunch_id}"
    record = json.loads((Path(env.config.runtime_dir) / state.STAGED).read_text())
    assert record["entry"]["id"] == name and record["signed"] == ["kernel"]
    assert set(record["digests"]) == {"kernel", "initrd", "cmdline"}     # measured as a UKI's
    event = engine.history()[0]
    assert event["event"] == "staged" and event["detail"]["entry"] == name
    # The record survives a daemon restart as it was.
    assert Engine(env.config, env.machine).staged_image == image


def test_a_uki_entry_is_signed_as_a_whole(env):
    image = env.staged(env.engine(), entry="next-boot")
    assert image["entry"]["id"] == UKI and image["entry"]["type"] == "type2"
    assert image["signed"] == ["image"] and image["unsigned"] == []
    assert image["path"] == f"/efi/EFI/Linux/{UKI}"


def test_an_entry_by_id_or_kernel_install_name(env):
    engine = env.engine()
    assert env.staged(engine, entry=OLDER.upper())["entry"]["id"] == f"{OLDER}.conf"
    assert env.staged(engine, entry=f"{NEWER}.conf")["entry"]["id"] == f"{NEWER}.conf"
    with pytest.raises(NoBootEntry, match="no-such"):
        engine.stage("", entry="no-such")
    assert engine.state == "staged"            # a refusal changes nothing


def test_the_oneshot_variable_changes_what_next_boot_stages(env):
    bootfixtures.set_efivars(env.root, {"LoaderEntryOneShot": f"{OLDER}.conf"})
    assert env.staged(env.engine(), entry="next-boot")["entry"]["id"] == f"{OLDER}.conf"


def test_unsigned_parts_are_refused_unless_allowed(env):
    engine = env.engine(trust=dataclasses.replace(env.config.trust,
                                                  allow_unsigned_initrd=False))
    with pytest.raises(VerificationFailed) as info:
        engine.stage("", entry=NEWER)
    assert "trust.allow_unsigned_initrd" in str(info.value)
    assert "initrd and options" in str(info.value)
    assert engine.state == "idle" and env.machine.calls == []
    # A UKI needs no such permission: everything in it is signed.
    assert env.staged(engine, entry=UKI)["entry"]["id"] == UKI


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"entry": "next-boot", "path": "/efi/x.efi"}, InvalidArgument, "not both"),
    ({"entry": "next-boot", "cmdline": "x"}, InvalidArgument, "options are the command line"),
    ({"entry": "next-boot", "profile": 1}, InvalidArgument, "profile"),
    ({"entry": ""}, InvalidArgument, "entry must be"),
    ({"if_auto_stage": True, "path": "/efi/x.efi"}, InvalidArgument, "if_auto_stage"),
])
def test_bad_requests_are_refused_before_any_work(env, kwargs, error, words):
    engine = env.engine()
    path = kwargs.pop("path", "")
    with pytest.raises(error, match=words):
        engine.stage(path, **kwargs)
    assert engine.state == "idle" and env.machine.calls == []


def test_entries_relaunchd_cannot_stage_are_refused_with_every_reason(env):
    (env.esp / TOKEN / "6.1.0-15-amd64" / "initrd.img").unlink()
    engine = env.engine()
    with pytest.raises(InvalidBootEntry, match="initrd-missing"):
        engine.stage("", entry=NEWER)
    type1(env.esp, "6.1.0-16-amd64", extra="devicetree /dtb\n")
    (env.esp / "dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    with pytest.raises(InvalidBootEntry, match="device tree"):
        engine.stage("", entry=f"{TOKEN}-6.1.0-16-amd64")
    assert engine.state == "idle" and env.machine.calls == []


def test_a_uki_entry_outside_the_image_directories_is_refused(env, tmp_path):
    engine = env.engine(image_dirs=(str(tmp_path / "elsewhere"),))
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        engine.stage("", entry=UKI)
    assert env.machine.calls == []


def test_no_entries_at_all(env, tmp_path):
    empty = tmp_path / "empty"
    (empty / "efi").mkdir(parents=True)
    env.machine.boot_root = str(empty)
    with pytest.raises(NoBootEntry, match="no boot loader entry would boot next"):
        env.engine(root=str(empty)).stage("", entry="next-boot")


def test_if_auto_stage_stages_only_when_configured(env):
    engine = env.engine()
    assert engine.config.auto_stage == "off"
    assert engine.stage("", entry="next-boot", if_auto_stage=True) == ""
    assert engine.state == "idle" and env.machine.calls == [] and engine.history() == []
    engine = env.engine(auto_stage="next-boot")
    relaunch_id = engine.stage("", entry="next-boot", if_auto_stage=True)
    assert relaunch_id and engine.wait(5) == "staged"
    assert engine.staged_image["entry"]["id"] == UKI


def staged_with(env: Env, entry: str) -> Engine:
    engine = env.engine()
    env.staged(engine, entry=entry)
    return engine


@pytest.mark.parametrize(("if_entry", "if_kernel"), [
    (NEWER, None),                              # kernel-install's TOKEN-KVER
    (f"{NEWER}.CONF", None),                    # the loader's id, any case
    (None, "6.1.0-15-amd64"),                   # a Type #1 entry's version
    ("something-else", "6.1.0-15-amd64"),       # either one
])
def test_cancel_if_the_staged_entry_matches(env, if_entry, if_kernel):
    engine = staged_with(env, NEWER)
    engine.cancel(if_entry=if_entry, if_kernel=if_kernel)
    assert engine.state == "idle" and env.machine.calls[-1] == ("unload",)
    assert engine.history()[0]["event"] == "unstaged"


@pytest.mark.parametrize(("if_entry", "if_kernel"), [
    (OLDER, None), (None, "6.1.0-13-amd64"), (OLDER, "6.1.0-13-amd64")])
def test_cancel_of_another_entry_leaves_the_stage_alone(env, if_entry, if_kernel):
    engine = staged_with(env, NEWER)
    with pytest.raises(NotStaged, match="nothing from"):
        engine.cancel(if_entry=if_entry, if_kernel=if_kernel)
    assert engine.state == "staged" and ("unload",) not in env.machine.calls


def test_a_uki_entry_matches_by_its_uname(env):
    engine = staged_with(env, UKI)
    with pytest.raises(NotStaged):
        engine.cancel(if_kernel="6.1.0-15-amd64")
    engine.cancel(if_kernel="6.1.0-20-amd64")
    assert engine.state == "idle"


def test_filtered_cancel_never_touches_an_image_staged_by_path(env):
    engine = env.engine()
    engine.stage(str(env.esp / "EFI" / "Linux" / UKI))
    assert engine.wait(5) == "staged"
    with pytest.raises(NotStaged):
        engine.cancel(if_entry=UKI)
    assert engine.state == "staged"
    engine.cancel()
    with pytest.raises(NotStaged, match="nothing is staged"):
        engine.cancel(if_entry=UKI)


def test_filtered_cancel_while_the_entry_is_being_staged(env):
    env.machine.release_prepare.clear()
    engine = env.engine()
    engine.stage("", entry=NEWER)
    assert env.machine.in_prepare.wait(5)
    with pytest.raises(NotStaged):
        engine.cancel(if_entry=OLDER)
    assert engine.state == "staging"
    engine.cancel(if_kernel="6.1.0-15-amd64")
    env.machine.release_prepare.set()
    assert engine.wait(5) == "idle"
    assert engine.history()[0]["event"] == "cancelled"


def test_list_images_has_the_loader_and_every_entry_with_its_verdict(env):
    items = env.engine().list_images()
    kinds = [i["kind"] for i in items]
    assert kinds == ["image", "boot-loader", "boot-entry", "boot-entry", "boot-entry"]
    loader = items[1]
    assert loader["esp"] == "/efi" and loader["next_boot"] == UKI
    assert loader["next_boot_reason"] == "first entry" and "entries" not in loader
    entries = items[2:]
    assert [e["id"] for e in entries] == [UKI, f"{NEWER}.conf", f"{OLDER}.conf"]
    assert [e["next_boot"] for e in entries] == [True, False, False]
    assert [e["default"] for e in entries] == [True, False, False]
    # Verified against the configured trust: none of these stand-ins is signed.
    assert all(e["verified"] is False for e in entries)
    assert all(e["stageable"] for e in entries)
    assert entries[1]["signed_parts"] == ["kernel"] and entries[0]["signed_parts"] == ["image"]
    json.dumps(items)


def test_list_images_without_boot_partitions_or_with_a_wrong_esp(env, tmp_path):
    env.machine.boot_root = None
    items = env.engine().list_images()
    assert [i["kind"] for i in items] == ["image", "boot-loader"]
    assert items[1]["esp"] is None and items[1]["notes"]
    env.machine.boot_root = str(env.root)
    items = env.engine(boot_entries=BootEntriesConfig(esp="/nope")).list_images()
    assert items[-1]["kind"] == "boot-loader"
    assert items[-1]["error"].startswith("InvalidArgument: ESP path '/nope'")


def test_list_images_verdict_of_a_signed_uki(env, keys, tmp_path):
    signed = ukibuild.sign(env.esp / "EFI" / "Linux" / UKI, keys["db"], tmp_path / "s.efi")
    (env.esp / "EFI" / "Linux" / UKI).write_bytes(signed.read_bytes())
    entry = next(i for i in env.engine().list_images() if i.get("id") == UKI)
    assert entry["verified"] is True and entry["verified_by"] == "CN=relaunchd test db"


def test_auto_stage_config_accepts_yaml_off():
    from relaunchd.engine.config_file import parse_config
    from relaunchd.errors import ConfigError

    assert parse_config("auto_stage: off\n").auto_stage == "off"
    assert parse_config("auto_stage: 'off'\n").auto_stage == "off"
    assert parse_config("auto_stage: next-boot\n").auto_stage == "next-boot"
    for bad in ("on", "true", "yes", "next_boot"):
        with pytest.raises(ConfigError, match="auto_stage: must be one of off, next-boot"):
            parse_config(f"auto_stage: {bad}\n")
    loaded = parse_config("boot_entries: {esp: /boot/efi, xbootldr: null}\n"
                          "trust: {allow_unsigned_initrd: true}\n")
    assert loaded.boot_entries == BootEntriesConfig(esp="/boot/efi", xbootldr=None)
    assert loaded.trust.allow_unsigned_initrd is True
    with pytest.raises(ConfigError, match="boot_entries.esp: must be an absolute path"):
        parse_config("boot_entries: {esp: efi}\n")
