"""platform.boot_entries on fixture machines: reading the ESP and XBOOTLDR by descriptor
without following anything out of the partition, the loader's variables, a listing that
always completes, and the files a stage opens."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaunchd.errors import InvalidBootEntry, NoBootEntry
from relaunchd.formats import boot_entries as fmt
from relaunchd.platform import boot_entries
from relaunchd.platform.sysroot import SysRoot
from support import bootfixtures
from support.bootfixtures import tree

ENTRY = "title T\nsort-key t\nversion 1\nlinux /vmlinuz\n"


# --------------------------------------------------------------------------- reading


def listing(tmp_path, **kw) -> boot_entries.Listing:
    return boot_entries.list_entries(SysRoot(str(tmp_path)), esp="/efi", **kw)


def by_id(result: boot_entries.Listing) -> dict[str, boot_entries.ListedEntry]:
    return {e.id: e for e in result.entries}


def test_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    tree(outside, {"vmlinuz": "k", "entry.conf": ENTRY})
    tree(tmp_path, {"/efi/loader/entries/a.conf": "title A\nlinux /sub/vmlinuz\n",
                    "/efi/loader/entries/b.conf": "title B\nlinux /lnk\n"})
    (tmp_path / "efi" / "sub").symlink_to(outside)
    (tmp_path / "efi" / "lnk").symlink_to(outside / "vmlinuz")
    (tmp_path / "efi" / "loader" / "entries" / "c.conf").symlink_to(outside / "entry.conf")
    found = by_id(listing(tmp_path))
    assert set(found) == {"a.conf", "b.conf"}          # c.conf, a symlink, is not read
    for name in ("a.conf", "b.conf"):
        [problem] = found[name].entry.problems
        assert problem.reason == fmt.KERNEL_MISSING and not found[name].entry.listed
    assert "symbolic link" in found["b.conf"].entry.problems[0].detail


def test_partition_root_behind_a_symlink_is_refused(tmp_path):
    tree(tmp_path, {"/real/loader/entries/a.conf": ENTRY, "/real/vmlinuz": "k"})
    (tmp_path / "efi").symlink_to(tmp_path / "real")
    result = listing(tmp_path)
    assert result.entries == [] and result.next_boot is None
    assert any("esp /efi not read" in n for n in result.notes)
    with pytest.raises(NoBootEntry):
        boot_entries.next_boot(result)


def test_bounds_and_permissions(tmp_path):
    tree(tmp_path, {"/efi/vmlinuz": "k", "/efi/loader/entries/big.conf":
                    b"# " + b"x" * boot_entries.ENTRY_LIMIT + b"\nlinux /vmlinuz\n",
                    "/efi/loader/entries/open.conf": ENTRY,
                    "/efi/loader/entries/fine.conf": ENTRY,
                    "/efi/loader/loader.conf": b"default " + b"o" * boot_entries.LOADER_CONF_LIMIT})
    os.chmod(tmp_path / "efi" / "loader" / "entries" / "open.conf", 0o666)
    result = listing(tmp_path)
    found = by_id(result)
    assert [p.reason for p in found["big.conf"].entry.problems] == [fmt.TOO_LARGE]
    assert [p.reason for p in found["open.conf"].entry.problems] == [fmt.WRITABLE_BY_NON_ROOT]
    assert found["open.conf"].entry.listed and not found["open.conf"].entry.stageable
    assert found["fine.conf"].entry.stageable
    assert any(n.startswith("loader.conf ignored") for n in result.notes)
    with pytest.raises(InvalidBootEntry, match="writable-by-non-root"):
        boot_entries.require_stageable(found["open.conf"])
    boot_entries.require_stageable(found["fine.conf"], require_verified=False)


def test_loader_variables(tmp_path):
    tree(tmp_path, {"/efi/vmlinuz": "k", "/efi/loader/entries/a.conf": ENTRY,
                    "/efi/loader/entries/b.conf": ENTRY.replace("version 1", "version 2")})
    bootfixtures.set_efivars(tmp_path, {"LoaderEntryOneShot": "A.CONF",
                                        "LoaderInfo": "systemd-boot 252.39-1~deb12u2",
                                        "LoaderEntrySelected": "b.conf"})
    result = listing(tmp_path)
    assert (result.next_boot.id, result.default.id) == ("a.conf", "b.conf")
    assert result.next_boot_reason == "LoaderEntryOneShot"
    assert (result.loader, result.selected) == ("systemd-boot 252.39-1~deb12u2", "b.conf")
    data = result.to_json()
    assert data["next_boot"] == "a.conf" and data["oneshot"] == "A.CONF"
    assert [e["next_boot"] for e in data["entries"]] == [False, True]
    # A variable efivarfs shows with an odd payload, or bad UTF-16, is reported, not used.
    efivars = tmp_path / "sys" / "firmware" / "efi" / "efivars"
    (efivars / f"LoaderEntryOneShot-{fmt.LOADER_GUID}").write_bytes(b"\7\0\0\0abc")
    (efivars / f"LoaderEntryDefault-{fmt.LOADER_GUID}").write_bytes(
        b"\7\0\0\0" + struct.pack("<H", 0xDC00))
    (efivars / f"LoaderInfo-{fmt.LOADER_GUID}").write_bytes(b"\7\0")
    result = listing(tmp_path)
    assert result.next_boot.id == "b.conf" and result.next_boot_reason == "first entry"
    assert sum("not a UTF-16 string" in n for n in result.notes) == 2
    assert any("shorter than its attributes" in n for n in result.notes)


def test_find_by_id_or_kernel_install_name(tmp_path):
    tree(tmp_path, {"/efi/vmlinuz": "k",
                    "/efi/loader/entries/Debian-6.1.0-13-amd64+2-1.conf": ENTRY})
    result = listing(tmp_path)
    for name in ("debian-6.1.0-13-amd64+2-1.conf", "Debian-6.1.0-13-amd64+2-1.CONF",
                 "debian-6.1.0-13-amd64"):
        assert boot_entries.find(result, name).entry.file_name == \
            "Debian-6.1.0-13-amd64+2-1.conf"
    with pytest.raises(NoBootEntry, match="debian-6.1.0-13-amd64"):
        boot_entries.find(result, "debian-6.1.0-9-amd64")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=st.binary(max_size=400), conf=st.binary(max_size=200),
       oneshot=st.binary(max_size=40),
       name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9+.\-_]{0,19}\.conf", fullmatch=True))
def test_any_tree_lists_without_an_exception(tmp_path_factory, entry, conf, oneshot, name):
    base = tmp_path_factory.mktemp("fuzz")
    tree(base, {f"/efi/loader/entries/{name}": entry, "/efi/loader/loader.conf": conf,
                "/efi/vmlinuz": "k", "/efi/EFI/Linux/junk.efi": entry})
    efivars = base / "sys" / "firmware" / "efi" / "efivars"
    efivars.mkdir(parents=True)
    (efivars / f"LoaderEntryOneShot-{fmt.LOADER_GUID}").write_bytes(oneshot)
    result = boot_entries.list_entries(SysRoot(str(base)), esp="/efi")
    assert {e.id for e in result.entries} == {fmt.ascii_lower(name), "junk.efi"}
    result.to_json()


# --------------------------------------------------------------------------- staging


def test_open_files_for_staging(tmp_path):
    tree(tmp_path, {"/efi/k/vmlinuz": "kernel", "/efi/k/ucode.img": "ucode",
                    "/efi/k/initrd.img": "initrd", "/efi/EFI/tools/shell.efi": "shell",
                    "/efi/loader/entries/a.conf": "title A\nlinux /k/vmlinuz\n"
                    "initrd /k/ucode.img\ninitrd /k/initrd.img\noptions quiet\n",
                    "/efi/loader/entries/s.conf": "title S\nefi /EFI/tools/shell.efi\n"})
    result = listing(tmp_path)
    found = by_id(result)
    with boot_entries.open_files(SysRoot(str(tmp_path)), found["a.conf"]) as files:
        assert os.pread(files.kernel, 100, 0) == b"kernel"
        assert [(p, os.pread(fd, 100, 0)) for p, fd in files.initrds] == [
            ("/efi/k/ucode.img", b"ucode"), ("/efi/k/initrd.img", b"initrd")]
        opened = [files.kernel, *(fd for _, fd in files.initrds)]
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(InvalidBootEntry, match="efi-program"):
        boot_entries.open_files(SysRoot(str(tmp_path)), found["s.conf"])
    # Swapped for a symbolic link after the listing: refused, nothing left open.
    (tmp_path / "efi" / "k" / "initrd.img").unlink()
    (tmp_path / "efi" / "k" / "initrd.img").symlink_to("/etc/passwd")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidBootEntry, match="symbolic link"):
        boot_entries.open_files(SysRoot(str(tmp_path)), found["a.conf"])
    assert len(os.listdir("/proc/self/fd")) == before


def test_staged_record_and_matching(tmp_path):
    tree(tmp_path, {"/efi/vmlinuz": "k", "/efi/loader/entries/Tok-6.1.0-13-amd64+3.conf":
                    "title D\nversion 6.1.0-13-amd64\nlinux /vmlinuz\n"})
    [listed] = listing(tmp_path).entries
    record = listed.staged_record()
    assert record["id"] == "tok-6.1.0-13-amd64+3.conf" and record["stem"] == "Tok-6.1.0-13-amd64"
    assert record["signed"] == ["kernel"] and record["unsigned"] == []
    match = boot_entries.staged_entry_matches
    assert match(record, entry="tok-6.1.0-13-amd64")
    assert match(record, entry="TOK-6.1.0-13-AMD64+3.conf")
    assert match(record, kernel="6.1.0-13-amd64")
    assert not match(record, entry="tok-6.1.0-9-amd64", kernel="6.1.0-9-amd64")
    assert not match(record)
    uki = {"id": "debian.efi", "stem": "debian", "type": fmt.TYPE2, "version": "12",
           "uname": "6.1.0-13-amd64"}
    assert match(uki, kernel="6.1.0-13-amd64") and not match(uki, kernel="12")
