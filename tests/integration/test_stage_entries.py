"""Boot loader entries staged for real (dry run: this host kernel has no kexec): a Type #1
entry of Debian's signed kernel is what systemd-boot 252 would boot — the kernel's
signature checked by `sbverify` on what staging hands over, the initrd what `cat` makes
of the entry's initrds, the command line the entry's options — and is measured like a
UKI; a Type #2 entry stages exactly as its UKI does by path; the CLI (`--next-boot`
locally) and the daemon over a private bus (Stage with `entry`, `if_auto_stage`, Cancel
with `if_entry`/`if_kernel`, ListImages' boot entries, through relaunchctl) on the same
trees. The real loader and a real relaunch are the VM tier's
(tests/vm/test_relaunch_entries.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from relaunchd.errors import InvalidBootEntry, InvalidImage, VerificationFailed
from relaunchd.launch import entry_staging, staging
from relaunchd.platform import boot_entries, image_files, sealed_memfd
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.trust_store import load_certificates
from support import ukibuild
from support.dbus_harness import Daemon, PrivateBus, relaunchctl
from support.memmaps import QEMU_2G, write_memmap

PLATFORMS = Path(__file__).resolve().parents[1] / "fixtures" / "platforms"
TYPE1_OPTIONS = ("options root=/dev/vda  ro\n"          # two spaces: kept, as the loader does
                 "options\tquiet console=ttyS0\n")     # a second line joins with one space
OPTIONS = "root=/dev/vda  ro quiet console=ttyS0"


@dataclasses.dataclass
class Tree:
    root: Path
    esp: Path
    kernels: dict[str, Path]

    def listing(self) -> boot_entries.Listing:
        return boot_entries.list_entries(SysRoot(str(self.root)), esp="/efi")

    def entry(self, name: str) -> boot_entries.ListedEntry:
        return boot_entries.find(self.listing(), name)


def conf(esp: Path, name: str, kernel: str, *, version: str, initrds: tuple[str, ...] = (),
         extra: str = TYPE1_OPTIONS) -> None:
    lines = [f"title {name}", "sort-key debian", f"version {version}", f"linux {kernel}",
             *(f"initrd {i}" for i in initrds)]
    (esp / "loader" / "entries" / f"{name}.conf").write_text("\n".join(lines) + "\n" + extra)


@pytest.fixture
def tree(tmp_path, debian_kernel, keys, real_ukis) -> Tree:
    root = tmp_path / "root"
    shutil.copytree(PLATFORMS / "vm-no-tpm" / "root", root, symlinks=True)
    esp = root / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    k = esp / "k"
    k.mkdir()
    kernels = {"debian": k / "debian", "db": k / "db-signed", "unsigned": k / "unsigned",
               "text": k / "text"}
    shutil.copy(debian_kernel.vmlinuz, kernels["debian"])
    ukibuild.sign(debian_kernel.vmlinuz, keys["db"], kernels["db"])
    shutil.copy(debian_kernel.vmlinuz, kernels["unsigned"])
    ukibuild.run(["sbattach", "--remove", str(kernels["unsigned"])])
    kernels["text"].write_text("not a kernel\n")
    (k / "initrd1").write_bytes(os.urandom(3001))         # odd sizes: no padding between
    (k / "empty").write_bytes(b"")
    (k / "initrd2").write_bytes(b"second initrd\n" * 77)
    conf(esp, "db", "/k/db-signed", version="6.1.0-30-amd64",
         initrds=("/k/initrd1", "/k/empty", "/k/initrd2"))
    for name in ("debian", "unsigned", "text"):
        conf(esp, name, f"/k/{name}", version="1", initrds=("/k/initrd1",))
    shutil.copy(real_ukis["signed"], esp / "EFI" / "Linux" / "signed.efi")
    return Tree(root, esp, kernels)


def stage_options(tree: Tree, keys, **kw) -> staging.StageOptions:
    kw.setdefault("trusted", load_certificates([str(keys["db"].cert)]))
    return staging.StageOptions(policy=image_files.ImagePolicy((str(tree.esp),)),
                                root=SysRoot(str(tree.root)), **kw)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def sbverify(path: Path, cert: Path) -> bool:
    return ukibuild.sbverify(path, cert)


def test_type1_is_what_the_loader_would_boot_and_is_measured_like_a_uki(tree, keys, tmp_path):
    from relaunchd.engine.host_machine import HostMachine

    listed = tree.entry("db")
    staged = entry_staging.prepare(listed, stage_options(tree, keys, append=["rld.x=1"]),
                                   allow_unsigned_parts=True)
    out = tmp_path / "out"
    try:
        assert all(sealed_memfd.is_sealed(p.fd) for p in (staged.kernel, staged.initrd))
        staging.write_artifacts(staged, str(out))
        digests = HostMachine(SysRoot(str(tree.root))).digests(staged, ("sha256", "sha384"))
    finally:
        staged.close()
    # The kernel handed over is the signed file, and sbverify accepts exactly that.
    assert (out / "kernel").read_bytes() == tree.kernels["db"].read_bytes()
    assert sbverify(out / "kernel", keys["db"].cert)
    # The initrd is the entry's initrds end to end, the empty one skipped: what cat makes.
    k = tree.esp / "k"
    cat = subprocess.run(["cat", str(k / "initrd1"), str(k / "empty"), str(k / "initrd2")],
                         capture_output=True, check=True, timeout=30).stdout
    assert (out / "initrd").read_bytes() == cat
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cmdline"] == f"{OPTIONS} rld.x=1 relaunchd.id={staged.id}"
    assert (out / "cmdline").read_bytes() == plan["cmdline"].encode() + b"\0"
    assert plan["initrd"]["parts"] == ["/efi/k/initrd1", "/efi/k/initrd2"]
    assert any("/efi/k/empty is empty: skipped" in n for n in plan["notes"])
    assert plan["signature"]["verified"] is True
    assert plan["signature"]["verified_by"] == "CN=relaunchd test db"
    assert plan["pcr11"] is None and plan["profile"] is None
    assert plan["entry"]["signed"] == ["kernel"]
    assert plan["entry"]["unsigned"] == ["initrd", "options"]
    # What a relaunch extends into PCR 23: the digests of these very bytes.
    for bank in ("sha256", "sha384"):
        assert digests["kernel"][bank] == hashlib.new(bank, (out / "kernel").read_bytes()
                                                      ).hexdigest()
        assert digests["initrd"][bank] == hashlib.new(bank, cat).hexdigest()
        assert digests["cmdline"][bank] == hashlib.new(bank, plan["cmdline"].encode()
                                                       ).hexdigest()
    assert plan["kernel"]["sha256"] == digests["kernel"]["sha256"]
    assert plan["initrd"]["sha256"] == digests["initrd"]["sha256"]


def test_a_distribution_signed_kernel_verifies_like_a_uki(tree, keys, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from relaunchd.formats import authenticode, pe

    fd = os.open(tree.kernels["debian"], os.O_RDONLY)
    try:
        [sig] = authenticode.read_signatures(fd, pe.parse_headers(
            pe.FileRange(fd, 0, os.fstat(fd).st_size)))
    finally:
        os.close(fd)
    debian_pem = tmp_path / "debian.pem"
    debian_pem.write_bytes(x509.load_der_x509_certificate(sig.certificates[0])
                           .public_bytes(serialization.Encoding.PEM))
    trusted = load_certificates([str(debian_pem)])
    for name in ("debian", "db"):          # sbsign kept Debian's signature on db-signed
        assert sbverify(tree.kernels[name], debian_pem)
        staged = entry_staging.prepare(tree.entry(name), stage_options(tree, keys,
                                                                       trusted=trusted),
                                       allow_unsigned_parts=True)
        try:
            assert staged.signature.verified, staged.signature.reasons
            assert "Debian" in staged.signature.verified_by
        finally:
            staged.close()


@pytest.mark.parametrize(("name", "trust", "words"), [
    ("unsigned", "db", "image is not signed"),
    ("text", "db", "not a PE image"),
    ("db", "other", "not trusted"),
])
def test_kernels_that_do_not_verify_are_refused_and_leave_nothing(tree, keys, name, trust,
                                                                  words):
    assert not sbverify(tree.kernels[name], keys[trust].cert)
    before = open_fds()
    options = stage_options(tree, keys, trusted=load_certificates([str(keys[trust].cert)]))
    with pytest.raises(VerificationFailed, match=words):
        entry_staging.prepare(tree.entry(name), options, allow_unsigned_parts=True)
    assert open_fds() == before


def test_unsigned_parts_need_the_configuration(tree, keys):
    before = open_fds()
    with pytest.raises(VerificationFailed, match="trust.allow_unsigned_initrd"):
        entry_staging.prepare(tree.entry("db"), stage_options(tree, keys),
                              allow_unsigned_parts=False)
    assert open_fds() == before


def test_bytes_after_the_certificate_table_fail_as_with_sbverify(tree, keys):
    signed = tree.kernels["db"].read_bytes()
    tree.kernels["db"].write_bytes(signed + b"unsigned trailer" * 64)
    assert not sbverify(tree.kernels["db"], keys["db"].cert)
    with pytest.raises(VerificationFailed, match="image digest does not match"):
        entry_staging.prepare(tree.entry("db"), stage_options(tree, keys),
                              allow_unsigned_parts=True)


def test_the_opened_file_is_staged_even_if_the_path_changes(tree, keys, tmp_path,
                                                            monkeypatch):
    """Files are opened once, by descriptor: replacing the kernel on disk after it was
    opened changes nothing in what is staged."""
    original = tree.kernels["db"].read_bytes()
    copy = sealed_memfd.sealed_copy

    def swap_then_copy(fd, name, expected_size=None):
        replacement = tree.kernels["db"].with_name("replacement")
        shutil.copy(tree.kernels["unsigned"], replacement)
        os.replace(replacement, tree.kernels["db"])
        return copy(fd, name, expected_size)

    monkeypatch.setattr(sealed_memfd, "sealed_copy", swap_then_copy)
    staged = entry_staging.prepare(tree.entry("db"), stage_options(tree, keys),
                                   allow_unsigned_parts=True)
    try:
        staging.write_artifacts(staged, str(tmp_path / "out"))
    finally:
        staged.close()
    assert (tmp_path / "out" / "kernel").read_bytes() == original
    assert tree.kernels["db"].read_bytes() != original


def test_a_uki_entry_stages_as_its_uki_does_by_path(tree, keys):
    options = stage_options(tree, keys)
    by_entry = entry_staging.prepare(tree.entry("signed.efi"), options,
                                     allow_unsigned_parts=False)
    by_path = staging.prepare(str(tree.esp / "EFI" / "Linux" / "signed.efi"),
                              dataclasses.replace(options, relaunch_id=by_entry.id))
    try:
        assert by_entry.source == by_path.source
        assert by_entry.kernel.sha256 == by_path.kernel.sha256
        assert by_entry.initrd.sha256 == by_path.initrd.sha256
        assert by_entry.cmdline.text == by_path.cmdline.text
        assert by_entry.report.signature.verified
    finally:
        by_entry.close()
        by_path.close()
    outside = dataclasses.replace(options, policy=image_files.ImagePolicy(("/nowhere",)))
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        entry_staging.prepare(tree.entry("signed.efi"), outside, allow_unsigned_parts=False)


def test_what_cannot_be_staged_as_the_loader_boots_it(tree, keys):
    options = stage_options(tree, keys)
    with pytest.raises(InvalidBootEntry, match="custom command line"):
        entry_staging.prepare(tree.entry("db"), dataclasses.replace(
            options, custom_cmdline="x"), allow_unsigned_parts=True)
    (tree.esp / "k" / "initrd2").unlink()
    with pytest.raises(InvalidBootEntry, match="initrd-missing"):
        entry_staging.prepare(tree.entry("db"), options, allow_unsigned_parts=True)


def test_type1_through_the_segment_loader(tree, keys, tmp_path):
    options = stage_options(tree, keys, loader="segments")
    write_memmap(tree.root, QEMU_2G)
    staged = entry_staging.prepare(tree.entry("db"), options, allow_unsigned_parts=True)
    try:
        staging.write_artifacts(staged, str(tmp_path / "out"))
    finally:
        staged.close()
    out = tmp_path / "out"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["loader"] == "segments" and (out / "slrt.bin").exists()
    initrd = hashlib.sha256((out / "initrd").read_bytes()).hexdigest()
    line = (out / "cmdline").read_bytes()
    events = {e["label"]: e["digests"]["sha256"] for e in plan["drtm"]["events"]}
    assert events["Measured Kernel initrd"] == initrd
    assert events["Measured Kernel command line"] == hashlib.sha256(line).hexdigest()


def test_cli_next_boot_dry_run(tree, keys, tmp_path, capsys):
    from relaunchd.cli import main

    (tree.esp / "EFI" / "Linux" / "signed.efi").unlink()       # db is next (highest version)
    common = ["stage", "--next-boot", "--dry-run", "--root", str(tree.root), "--esp", "/efi",
              "--cert", str(keys["db"].cert), "--image-dir", str(tree.esp)]
    assert main(common) == 1
    assert "trust.allow_unsigned_initrd" in capsys.readouterr().err
    rc = main([*common, "--allow-unsigned-initrd", "--json", "--output", str(tmp_path / "o")])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["loaded"] is False
    assert doc["entry"]["id"] == "db.conf" and doc["entry"]["signed"] == ["kernel"]
    assert doc["cmdline"] == f"{OPTIONS} relaunchd.id={doc['id']}"
    assert main(["stage", "--entry", "db", "/efi/x.efi"]) == 2
    assert "exactly one" in capsys.readouterr().err


# ------------------------------------------------------------------ through the daemon


@pytest.fixture(scope="module")
def private_bus():
    bus = PrivateBus().start()
    yield bus
    bus.stop()


def daemon_config(tree: Tree, keys, tmp_path: Path, **extra) -> Path:
    for d in ("state", "run"):
        (tmp_path / d).mkdir(exist_ok=True)
    config = {"root": str(tree.root), "state_dir": str(tmp_path / "state"),
              "runtime_dir": str(tmp_path / "run"), "image_dirs": [str(tree.esp)],
              "trust": {"certificates": [str(keys["db"].cert)],
                        "allow_unsigned_initrd": True},
              "boot_entries": {"esp": "/efi"}, "launch": {"method": "kexec"}, **extra}
    path = tmp_path / "relaunchd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ctl(bus, *args: str) -> tuple[int, dict]:
    result = relaunchctl(bus, *args, "--json", timeout=120)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_the_daemon_stages_lists_and_cancels_entries(private_bus, tree, keys, tmp_path):
    (tree.esp / "EFI" / "Linux" / "signed.efi").unlink()
    daemon = Daemon(private_bus, daemon_config(tree, keys, tmp_path),
                    engine="fake-machine").start()
    try:
        # auto_stage is off: the kernel-install plugin's call stages nothing.
        rc, doc = ctl(private_bus, "stage", "--next-boot", "--if-auto-stage")
        assert rc == 0 and doc["id"] is None and doc["auto_stage"] is False
        assert ctl(private_bus, "status")[1]["State"] == "idle"

        rc, doc = ctl(private_bus, "stage", "--next-boot")
        assert rc == 0, doc
        staged = doc["staged"]
        assert staged["entry"]["id"] == "db.conf" and staged["signed"] == ["kernel"]
        assert staged["unsigned"] == ["initrd", "options"]
        assert staged["path"] == "/efi/loader/entries/db.conf"
        assert staged["cmdline"] == f"{OPTIONS} relaunchd.id={doc['id']}"
        record = json.loads((tmp_path / "run" / "staged.json").read_text())
        assert set(record["digests"]) == {"kernel", "initrd", "cmdline"}

        rc, items = ctl(private_bus, "images")
        assert rc == 0
        loader = next(i for i in items if i["kind"] == "boot-loader")
        assert loader["next_boot"] == "db.conf" and loader["esp"] == "/efi"
        verdicts = {i["id"]: i.get("verified") for i in items if i["kind"] == "boot-entry"}
        assert verdicts == {"db.conf": True, "debian.conf": False, "unsigned.conf": False,
                            "text.conf": False}

        # kernel-install removing another kernel leaves the stage alone...
        rc, doc = ctl(private_bus, "cancel", "--if-entry", "debian", "--if-kernel", "1")
        assert rc == 0 and doc["cancelled"] is False and doc["state"] == "staged"
        assert "nothing from entry 'debian' or kernel '1'" in doc["reason"]
        # ...removing this one cancels it.
        rc, doc = ctl(private_bus, "cancel", "--if-entry", "x", "--if-kernel", "6.1.0-30-amd64")
        assert rc == 0 and doc == {"cancelled": True, "state": "idle"}
        # Without a filter, nothing staged is still a clean "no".
        rc, doc = ctl(private_bus, "cancel")
        assert rc == 1 and doc["error"]["name"] == "NotStaged"
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_the_daemon_auto_stages_and_refuses_with_named_errors(private_bus, tree, keys,
                                                              tmp_path):
    (tree.esp / "EFI" / "Linux" / "signed.efi").unlink()
    path = daemon_config(tree, keys, tmp_path, auto_stage="next-boot")
    config = yaml.safe_load(path.read_text())
    config["trust"]["allow_unsigned_initrd"] = False
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(private_bus, path, engine="fake-machine").start()
    try:
        rc, doc = ctl(private_bus, "stage", "--next-boot", "--if-auto-stage")
        assert rc == 1 and doc["error"]["name"] == "VerificationFailed"
        assert "trust.allow_unsigned_initrd" in doc["error"]["message"]
        rc, doc = ctl(private_bus, "stage", "--entry", "nope")
        assert rc == 1 and doc["error"]["name"] == "NoBootEntry"
        assert ctl(private_bus, "status")[1]["State"] == "idle"
    finally:
        daemon.stop()
