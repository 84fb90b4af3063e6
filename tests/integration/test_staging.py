"""Staging on the host, dry-run: sealed copies, stub-exact initrd/cmdline,
trust, location checks, and nothing left behind on failure. (Real loads
happen in the VM tier; this host kernel has no kexec.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pefile
import pytest

from relaunchd.errors import InvalidImage, KexecFailed, NotReady, VerificationFailed
from relaunchd.formats import cpio
from relaunchd.formats.pe import FileRange
from relaunchd.launch import staging
from relaunchd.platform import image_files, sealed_memfd
from relaunchd.platform.sysroot import SysRoot
from relaunchd.platform.trust_store import load_certificates
from support.memmaps import QEMU_2G, write_memmap


@pytest.fixture
def image_dir(tmp_path, real_ukis) -> Path:
    d = tmp_path / "images"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    for name in ("signed", "multi", "tampered", "signed-other", "minimal"):
        shutil.copy(real_ukis[name], d / f"{name}.efi")
    return d


def options(image_dir: Path, keys, **kw) -> staging.StageOptions:
    """A platform root without efivarfs: a BIOS machine, Secure Boot off."""
    kw.setdefault("trusted", load_certificates([str(keys["db"].cert)]))
    root = image_dir.parent / "platform"
    root.mkdir(exist_ok=True)
    return staging.StageOptions(policy=image_files.ImagePolicy((str(image_dir),)),
                                root=SysRoot(str(root)), **kw)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def section(path: Path, name: str) -> bytes:
    pe = pefile.PE(str(path), fast_load=True)
    s = next(s for s in pe.sections if s.Name.rstrip(b"\0").decode() == name)
    data = s.get_data()[: min(s.Misc_VirtualSize, s.SizeOfRawData)]
    pe.close()
    return data


def test_dry_run_artifacts(image_dir, keys, debian_kernel, tmp_path):
    staged = staging.prepare(str(image_dir / "signed.efi"), options(image_dir, keys))
    try:
        assert all(sealed_memfd.is_sealed(b.fd)
                   for b in (staged.image, staged.kernel, staged.initrd))
        out = tmp_path / "out"
        staging.write_artifacts(staged, str(out))
    finally:
        staged.close()
    # the kernel is Debian's signed vmlinuz, byte for byte (trimmed, uki.md §3.3)
    assert (out / "kernel").read_bytes() == debian_kernel.vmlinuz.read_bytes()
    initrd = (out / "initrd").read_bytes()
    embedded = section(image_dir / "signed.efi", ".initrd")
    assert initrd.startswith(embedded)
    members = {m.name: m.data for m in cpio.read_newc(initrd)}
    assert members[".extra/os-release"].startswith(b'PRETTY_NAME="Debian')
    assert members[".extra/tpm2-pcr-public-key.pem"].startswith(b"-----BEGIN PUBLIC KEY")
    assert json.loads(members[".extra/tpm2-pcr-signature.json"].rstrip(b"\0"))["sha256"]
    assert "etc/relaunchd-marker" in members
    plan = json.loads((out / "plan.json").read_text())
    cmd = (out / "cmdline").read_bytes()
    assert cmd.endswith(b"\0")
    assert cmd[:-1].decode() == plan["cmdline"]
    assert plan["cmdline"].startswith("console=ttyS0 root=/dev/vda rw quiet relaunchd.test=full")
    assert plan["cmdline"].endswith(f"relaunchd.id={plan['id']}")
    assert plan["initrd"]["size"] == len(initrd) and len(initrd) % 4 == 0
    # digests taken in the verification pass equal those of the bytes loaded
    assert plan["initrd"]["sha256"] == hashlib.sha256(initrd).hexdigest()
    assert plan["kernel"]["sha256"] == hashlib.sha256((out / "kernel").read_bytes()).hexdigest()
    assert plan["signature"]["verified_by"] == "CN=relaunchd test db"


def test_profile_and_custom_cmdline(image_dir, keys):
    opts = options(image_dir, keys, profile=1, allow_unsigned=True, trusted=[],
                   append=["relaunchd.marker=x"])
    staged = staging.prepare(str(image_dir / "multi.efi"), opts)
    try:
        assert staged.cmdline.text.startswith("console=ttyS0 debug relaunchd.marker=x ")
        assert ".extra/profile" in staged.initrd_parts
    finally:
        staged.close()


@pytest.mark.parametrize("name,error,fragment", [
    ("tampered.efi", VerificationFailed, "digest"),
    ("signed-other.efi", VerificationFailed, "not trusted"),
    ("minimal.efi", VerificationFailed, "not signed"),
])
def test_untrusted_images_leave_nothing(image_dir, keys, name, error, fragment):
    before = open_fds()
    with pytest.raises(error, match=fragment):
        staging.prepare(str(image_dir / name), options(image_dir, keys))
    assert open_fds() == before


def test_no_trust_configured_is_refused(image_dir, keys):
    with pytest.raises(VerificationFailed, match="no trusted certificates"):
        staging.prepare(str(image_dir / "signed.efi"), options(image_dir, keys, trusted=[]))


def test_location_checks(image_dir, keys, tmp_path):
    with pytest.raises(InvalidImage, match="not inside an allowed image directory"):
        staging.prepare(str(tmp_path / "x.efi"), options(image_dir, keys))
    sub = image_dir / "sub"
    sub.mkdir()
    shutil.copy(image_dir / "signed.efi", sub / "s.efi")
    os.chmod(sub, 0o777)
    with pytest.raises(InvalidImage, match="writable by non-root"):
        staging.prepare(str(sub / "s.efi"), options(image_dir, keys))
    os.chmod(sub, 0o755)
    os.chown(sub / "s.efi", 65534, 65534)
    with pytest.raises(InvalidImage, match="owned by uid 65534"):
        staging.prepare(str(sub / "s.efi"), options(image_dir, keys))
    (image_dir / "link.efi").symlink_to(image_dir / "signed.efi")
    with pytest.raises(InvalidImage, match="symbolic link"):
        staging.prepare(str(image_dir / "link.efi"), options(image_dir, keys))


def test_file_replaced_after_copy_changes_nothing(image_dir, keys, monkeypatch, debian_kernel,
                                                  tmp_path):
    """Swap the file on disk right after the sealed copy: what is verified and
    written out is still the original."""
    target = image_dir / "signed.efi"
    original_copy = sealed_memfd.split_copy

    def copy_then_tamper(fd, name, size=None, detach=None):
        result = original_copy(fd, name, size, detach)
        tampered = (image_dir / "tampered.efi").read_bytes()
        target.write_bytes(tampered)          # rewrite in place
        return result

    monkeypatch.setattr(sealed_memfd, "split_copy", copy_then_tamper)
    staged = staging.prepare(str(target), options(image_dir, keys))
    try:
        staging.write_artifacts(staged, str(tmp_path / "out"))
        assert staged.report.signature.verified
        # the sealed copy cannot be written to, grown or shrunk
        with pytest.raises(PermissionError):
            os.write(staged.image.fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(staged.image.fd, 10)
    finally:
        staged.close()
    assert "relaunchd.test=full" in (tmp_path / "out" / "cmdline").read_text()
    assert b"EVIL" in target.read_bytes()


def _initrd_tampered(image_dir: Path) -> bytes:
    """signed.efi with one byte of its `.initrd` changed (signature now wrong)."""
    data = bytearray((image_dir / "signed.efi").read_bytes())
    marker = data.find(b"full\n")
    assert marker > 0
    data[marker:marker + 4] = b"evil"
    return bytes(data)


def test_initrd_is_split_off_and_the_image_copy_has_a_hole(image_dir, keys):
    """The common shape: `.initrd` is copied once, straight into the initrd memfd, and
    the image copy reads zeros there; every digest still matches the file's bytes."""
    path = image_dir / "signed.efi"
    original = path.read_bytes()
    pe_file = pefile.PE(str(path), fast_load=True)
    init = next(x for x in pe_file.sections if x.Name.rstrip(b"\0") == b".initrd")
    offset, length = init.PointerToRawData, min(init.Misc_VirtualSize, init.SizeOfRawData)
    pe_file.close()
    staged = staging.prepare(str(path), options(image_dir, keys))
    try:
        assert staged.report.signature.verified
        assert all(sealed_memfd.is_sealed(b.fd)
                   for b in (staged.image, staged.kernel, staged.initrd))
        copy = os.pread(staged.image.fd, staged.image.size, 0)
        assert copy[offset:offset + length] == bytes(length)
        assert copy[:offset] == original[:offset]
        assert copy[offset + length:] == original[offset + length:]
        initrd = os.pread(staged.initrd.fd, staged.initrd.size, 0)
        assert initrd[:length] == original[offset:offset + length]
        assert staged.initrd.sha256 == hashlib.sha256(initrd).hexdigest()
        section_sha = {s.name: s.sha256 for s in staged.report.sections}[".initrd"]
        assert section_sha == hashlib.sha256(section(path, ".initrd")).hexdigest()
    finally:
        staged.close()


def test_file_rewritten_during_the_split_copy_is_refused(image_dir, keys, monkeypatch):
    """The file changes after the bytes before `.initrd` were copied: the copy mixes
    two versions, which verifies against no signature; nothing is left open."""
    target = image_dir / "signed.efi"
    evil = _initrd_tampered(image_dir)
    real_copy = sealed_memfd.copy_range
    calls = []

    def copy_and_rewrite(src, offset, length, dst):
        real_copy(src, offset, length, dst)
        calls.append(offset)
        if len(calls) == 1:
            with open(target, "r+b") as f:     # in place: the open descriptor sees it
                f.write(evil)

    monkeypatch.setattr(sealed_memfd, "copy_range", copy_and_rewrite)
    before = open_fds()
    with pytest.raises(VerificationFailed, match="digest"):
        staging.prepare(str(target), options(image_dir, keys))
    assert len(calls) == 3          # head, `.initrd` into its own memfd, tail
    assert open_fds() == before


def test_layout_changed_before_the_copy_is_refused(image_dir, keys, monkeypatch):
    """Between the first look at the file and the copy, it is replaced by a UKI whose
    `.initrd` lies elsewhere: the split no longer matches the sealed headers."""
    target = image_dir / "signed.efi"
    real_split = sealed_memfd.split_copy

    def replace_then_copy(fd, name, size=None, detach=None):
        other = (image_dir / "multi.efi").read_bytes()
        other += bytes(max(0, os.fstat(fd).st_size - len(other)))
        with open(target, "r+b") as f:
            f.write(other[:os.fstat(fd).st_size])
        return real_split(fd, name, size, detach)

    monkeypatch.setattr(sealed_memfd, "split_copy", replace_then_copy)
    before = open_fds()
    with pytest.raises(InvalidImage, match="changed while it was copied"):
        staging.prepare(str(target), options(image_dir, keys, allow_unsigned=True,
                                             trusted=[]))
    assert open_fds() == before


def test_ucode_first_takes_the_whole_copy_path(image_dir, keys, debian_kernel, tmp_path):
    """With `.ucode` the initrd does not start with `.initrd`, so nothing is split off:
    the image is copied whole and the initrd built from it, ucode first."""
    from support import ukibuild

    ucode = b"microcode blob\n" * 100
    uki = ukibuild.build_uki(ukibuild.UkiSpec([
        (".osrel", ukibuild.OS_RELEASE), (".cmdline", b"console=ttyS0"),
        (".ucode", ucode), (".initrd", b"the initrd payload"),
        (".linux", debian_kernel.vmlinuz)]), tmp_path / "ucode.efi")
    signed = ukibuild.sign(uki, keys["db"], image_dir / "ucode.efi")
    staged = staging.prepare(str(signed), options(image_dir, keys))
    try:
        assert staged.report.signature.verified
        assert staged.initrd_parts[:2] == [".ucode", ".initrd"]
        copy = os.pread(staged.image.fd, staged.image.size, 0)
        assert copy == signed.read_bytes()          # no hole
        initrd = os.pread(staged.initrd.fd, staged.initrd.size, 0)
        assert initrd.startswith(ucode + bytes(-len(ucode) % 4) + b"the initrd payload")
        assert staged.initrd.sha256 == hashlib.sha256(initrd).hexdigest()
    finally:
        staged.close()


def test_load_without_kexec_support_is_a_named_error(image_dir, keys):
    staged = staging.prepare(str(image_dir / "signed.efi"), options(image_dir, keys))
    try:
        if os.path.exists("/sys/kernel/kexec_loaded"):
            pytest.skip("this kernel supports kexec; real loads are tested in the VM")
        with pytest.raises(KexecFailed, match="ENOSYS"):
            staging.load(staged, SysRoot("/"))
    finally:
        staged.close()


def test_cli_dry_run_json(image_dir, keys, tmp_path, capsys):
    from relaunchd.cli import main

    rc = main(["stage", "--dry-run", "--json", "--output", str(tmp_path / "o"),
               "--image-dir", str(image_dir), "--cert", str(keys["db"].cert),
               str(image_dir / "signed.efi")])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["loaded"] is False
    assert sorted(Path(p).name for p in doc["written"]) == ["cmdline", "initrd", "kernel",
                                                             "plan.json"]
    rc = main(["stage", "--dry-run", "--image-dir", str(image_dir), "--cert",
               str(keys["other"].cert), str(image_dir / "signed.efi")])
    assert rc == 1
    assert "VerificationFailed" in capsys.readouterr().err


def test_bad_certificate_file_is_a_named_error_and_leaves_nothing(image_dir, keys, tmp_path,
                                                                  capsys):
    """--cert files load on a second thread while the image is copied; a bad one
    still ends the command with a named error, before anything is written."""
    from relaunchd.cli import EXIT_INVALID, main

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----\n")
    for cert, why in ((tmp_path / "missing.pem", "cannot read certificate"),
                      (garbage, "no CERTIFICATE block")):
        before = open_fds()
        rc = main(["stage", "--dry-run", "--output", str(tmp_path / "o"), "--image-dir",
                   str(image_dir), "--cert", str(cert), str(image_dir / "signed.efi")])
        err = capsys.readouterr().err
        assert rc == EXIT_INVALID and "InvalidArgument" in err and why in err
        assert "Traceback" not in err
        assert not (tmp_path / "o").exists()
        assert open_fds() == before


def test_certificate_files_add_to_the_given_certificates(image_dir, keys):
    opts = options(image_dir, keys, trusted=load_certificates([str(keys["other"].cert)]),
                   certificate_files=[str(keys["db"].cert)])
    staged = staging.prepare(str(image_dir / "signed.efi"), opts)
    try:
        assert staged.report.signature.verified_by == "CN=relaunchd test db"
    finally:
        staged.close()


def test_secure_boot_drops_custom_cmdline(image_dir, keys):
    opts = options(image_dir, keys, custom_cmdline="init=/bin/sh")
    efivars = Path(opts.root.root) / "sys/firmware/efi/efivars"
    efivars.mkdir(parents=True)
    (efivars / "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c").write_bytes(
        b"\x06\x00\x00\x00\x01")
    staged = staging.prepare(str(image_dir / "signed.efi"), opts)
    try:
        assert staged.cmdline.custom_dropped
        assert "init=/bin/sh" not in staged.cmdline.text
    finally:
        staged.close()
    (efivars / "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c").write_bytes(
        b"\x06\x00\x00\x00\x00")
    staged = staging.prepare(str(image_dir / "signed.efi"), opts)
    try:
        assert staged.cmdline.text.startswith("init=/bin/sh relaunchd.id=")
    finally:
        staged.close()




def test_segment_loader_dry_run(image_dir, keys, tmp_path):
    from relaunchd.formats import slrt
    from relaunchd.formats.x86 import boot_params

    opts = options(image_dir, keys, loader="segments")
    write_memmap(Path(opts.root.root), QEMU_2G)
    staged = staging.prepare(str(image_dir / "signed.efi"), opts)
    try:
        out = tmp_path / "out"
        staging.write_artifacts(staged, str(out))
    finally:
        staged.close()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["loader"] == "segments"
    zero_page = (out / "bootparams.bin").read_bytes()
    assert len(zero_page) == 4096
    slr_addr = int.from_bytes(zero_page[0x78:0x80], "little")
    assert slr_addr == plan["segments"]["slr_table_addr"] != 0
    assert zero_page[0x1EF] == 0, "sentinel must be 0 or the kernel wipes 0x078"
    table = slrt.parse((out / "slrt.bin").read_bytes())
    kinds = {type(e).__name__ for e in table.entries}
    assert {"DlInfo", "LogInfo", "EntryPolicy", "IntelInfo"} <= kinds
    seg = {s["name"]: s for s in plan["segments"]["segments"]}
    assert seg["kernel"]["address"] % (2 << 20) == 0
    dl = next(e for e in table.entries if type(e).__name__ == "DlInfo")
    assert dl.dlme_base == seg["kernel"]["address"] and dl.dl_launch == 0
    # the SLRT lies inside the setup_data segment the zero page points at
    head = int.from_bytes(zero_page[0x250:0x258], "little")
    assert head == seg["setup-data"]["address"] <= slr_addr < head + seg["setup-data"]["memsz"]
    fd = os.open(out / "kernel", os.O_RDONLY)
    try:
        header = boot_params.parse_setup_header(FileRange(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    assert seg["kernel"]["memsz"] >= header.init_size
    assert any("rehearsal" in n for n in plan["notes"])
    # The DRTM prediction: what a Secure Launch kernel extends into the sealing PCR per
    # our SLRT policy, recomputed here from the written artefacts and the parsed table.
    info = next(e for e in table.entries if type(e).__name__ == "IntelInfo")
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    text = (out / "cmdline").read_bytes().rstrip(b"\0")
    assert plan["drtm"]["seal_pcr"] == 17
    assert [(e["pcr"], e["label"], e["event_type"], e["digests"]) for e in
            plan["drtm"]["events"]] == [
        (17, "Measured Kernel initrd", 0x502, {"sha256": sha((out / "initrd").read_bytes())}),
        (17, "Measured Kernel command line", 0x502, {"sha256": sha(text + b"\0")}),
        (17, "Measured SLR Table", 0x502,
         {"sha256": sha(slrt.intel_info_measured_bytes(info))}),
    ]
    # INTEL_INFO is measured with boot_params_addr and txt_heap zeroed, so the digest is
    # that of 560 bytes whose address fields are zero.
    measured = slrt.intel_info_measured_bytes(info)
    assert len(measured) == 560 and info.boot_params_addr == seg["zero-page"]["address"]


def test_segment_loader_refused_under_lockdown(image_dir, keys):
    opts = options(image_dir, keys, loader="segments")
    lockdown = Path(opts.root.root) / "sys/kernel/security"
    lockdown.mkdir(parents=True)
    (lockdown / "lockdown").write_text("none [integrity] confidentiality\n")
    before = open_fds()
    with pytest.raises(NotReady, match="lockdown"):
        staging.prepare(str(image_dir / "signed.efi"), opts)
    assert open_fds() == before


def test_txt_method_not_ready_names_reasons(image_dir, keys):
    with pytest.raises(NotReady, match=r"txt method is not ready: .*\[cpu-"):
        staging.prepare(str(image_dir / "signed.efi"),
                        options(image_dir, keys, method="txt"))


def test_linux_that_is_not_a_bzimage_is_refused(image_dir, keys):
    from support import ukibuild

    fake = ukibuild.build_uki(ukibuild.UkiSpec([(".linux", b"MZ" + bytes(5000))]),
                              image_dir / "fake.efi")
    before = open_fds()
    with pytest.raises(InvalidImage, match="not a usable x86 bzImage"):
        staging.prepare(str(fake), options(image_dir, keys, allow_unsigned=True, trusted=[]))
    assert open_fds() == before


def test_txt_intel_info_comes_from_the_msrs_and_the_txt_heap(tmp_path):
    """INTEL_INFO for a TXT launch is read from /dev/cpu/0/msr and TXT.HEAP.BASE (the
    intel-txt-server fixture), never guessed; an unreadable MSR is NotReady. The MSR
    device takes the MSR number as the file offset, which a plain fixture file cannot
    model for consecutive MSRs (their 8-byte values would overlap), so the MSRs come
    from a reader over a table here."""
    from fixtures.platforms.build import materialize
    from relaunchd.formats import slrt
    from relaunchd.launch import txt
    from relaunchd.platform import readiness
    from relaunchd.platform.sysroot import Read, SysRoot

    root = materialize("intel-txt-server", tmp_path)
    facts = readiness.read_facts(readiness.ProbeConfig(root=str(root)))
    # Intel SDM vol. 3A §11.11: MTRRcap VCNT=2, MISC_ENABLE, MTRRdefType E=1 FE=1 WB,
    # 0-2 GiB WB and 2-3 GiB UC for 39 physical address bits.
    msrs = {0xFE: 0x502, 0x1A0: 0x851889, 0x2FF: 0xC06, 0x200: 0x6, 0x201: 0x7F80000800,
            0x202: 0x80000000, 0x203: 0x7FC0000800}

    class MsrRoot(SysRoot):
        def read_at(self, path, offset, size):
            if path == readiness.MSR_DEV and offset in msrs and size == 8:
                return Read(path, msrs[offset].to_bytes(8, "little"))
            if path == readiness.MSR_DEV:
                return Read(path, error="unreadable", detail="Input/output error")
            return super().read_at(path, offset, size)

    info = txt._intel_info(MsrRoot(str(root)), facts)
    assert info.txt_heap == 0x7A380000          # TXT.HEAP.BASE in the fixture's /dev/mem
    assert info.saved_misc_enable == 0x851889 and info.default_mem_type == 0xC06
    assert info.variable_mtrrs == (slrt.MtrrPair(0x6, 0x7F80000800),
                                   slrt.MtrrPair(0x80000000, 0x7FC0000800))
    del msrs[0x202]                             # one variable MTRR cannot be read
    with pytest.raises(NotReady, match=r"cannot read MSR 0x202"):
        txt._intel_info(MsrRoot(str(root)), facts)
    # The real fixture file holds only IA32_FEATURE_CONTROL: MTRRcap is a short read.
    with pytest.raises(NotReady, match=r"cannot read MSR 0xfe"):
        txt._intel_info(SysRoot(str(root)), facts)
