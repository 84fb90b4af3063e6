"""formats.boot_entries: the rules of systemd-boot 252, one by one (formats.versions has
its own tests).

The expectations come from systemd 252's sources (src/boot/efi/boot.c,
src/fundamental/string-util-fundamental.c, src/boot/efi/efi-string.c), quoted in the
module docstrings; the fixture trees are checked against bootctl in
tests/integration/test_boot_entries_bootctl.py and the version comparison against
`systemd-analyze compare-versions` in tests/integration/test_versions_oracle.py.
"""

from __future__ import annotations

import fnmatch as py_fnmatch
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaunchd.formats import boot_entries as fmt

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("name", "suffix", "expected"), [
    ("a+3.conf", ".conf", (3, 0, "a")),
    ("a+3-1.conf", ".conf", (3, 1, "a")),
    ("a+0-3.conf", ".conf", (0, 3, "a")),
    ("a+03.conf", ".conf", (3, 0, "a")),
    ("a+3.CONF", ".conf", (3, 0, "a")),          # the suffix in any case
    ("a+1+2.conf", ".conf", (2, 0, "a+1")),      # the last +
    ("deb-6.1+2-1.efi", ".efi", (2, 1, "deb-6.1")),
    ("a.conf", ".conf", None),
    ("a+.conf", ".conf", None),
    ("a+3x.conf", ".conf", None),                # the counter in the middle of the name
    ("a+3-.conf", ".conf", None),
    ("a+3-1-2.conf", ".conf", None),
    ("a+2147483648.conf", ".conf", None),        # over INT_MAX
    ("a+3.efi", ".conf", None),
])
def test_boot_counter(name, suffix, expected):
    counter = fmt.parse_counter(name, suffix)
    got = None if counter is None else (counter.left, counter.done, counter.stem)
    assert got == expected


def test_ids_are_lower_cased_file_names_with_the_counter():
    entry = fmt.parse_type1("Debian-6.1+3-0.conf", b"linux /vmlinuz\n", partition=fmt.ESP,
                            source="/loader/entries/Debian-6.1+3-0.conf", efi_machine="x64")
    assert entry.id == "debian-6.1+3-0.conf"
    assert entry.stem == "Debian-6.1"
    assert (entry.tries_left, entry.tries_done) == (3, 0)


# --------------------------------------------------------------------------- Type #1


def parse(text: str | bytes, name: str = "e.conf", machine: str = "x64") -> fmt.BootEntry:
    data = text.encode() if isinstance(text, str) else text
    return fmt.parse_type1(name, data, partition=fmt.ESP, source=f"/loader/entries/{name}",
                           efi_machine=machine)


def test_line_syntax_as_the_loader_reads_it():
    assert fmt.key_values('# c\n\n  title\t "Quoted title"  \r\nversion 1\nnovalue\n'
                          'options a=b  c\n') == [
        ("title", "Quoted title"), ("version", "1"), ("options", "a=b  c")]


def test_type1_fields():
    entry = parse("title One\ntitle Two\nversion 6.1\nsort-key debian\n"
                  "machine-id 0123456789abcdef0123456789abcdef\nlinux /EFI/debian/vmlinuz\n"
                  "initrd /EFI/debian/ucode.img\ninitrd EFI/debian/initrd.img\n"
                  "options root=/dev/vda\noptions quiet\ndevicetree /dtb/board.dtb\n"
                  "devicetree-overlay /a.dtbo /b.dtbo\nfrobnicate yes\n")
    assert entry.title == "Two"
    assert (entry.version, entry.sort_key) == ("6.1", "debian")
    assert entry.machine_id == "0123456789abcdef0123456789abcdef"
    assert (entry.loader, entry.kernel) == ("linux", "/EFI/debian/vmlinuz")
    assert entry.initrd == ("/EFI/debian/ucode.img", "/EFI/debian/initrd.img")
    assert entry.options == "root=/dev/vda quiet"
    assert entry.devicetree == "/dtb/board.dtb"
    assert entry.devicetree_overlay == ("/a.dtbo", "/b.dtbo")
    assert "unknown key 'frobnicate' ignored, as the loader does" in entry.notes
    assert entry.listed and entry.stageable and not entry.problems
    assert entry.signed_parts == ("kernel",)
    assert entry.unsigned_parts == ("initrd", "options", "devicetree")


def test_type1_problems():
    assert [p.reason for p in parse("title x\n").problems] == [fmt.NO_KERNEL]
    foreign = parse("linux /v\narchitecture aa64\n")
    assert [p.reason for p in foreign.problems] == [fmt.FOREIGN_ARCHITECTURE]
    assert parse("architecture X64\nlinux /v\n").listed     # compared ignoring case
    efi = parse("efi /EFI/tools/shell.efi\n")
    assert efi.listed and not efi.stageable and efi.loader == "efi"
    uki = parse("uki /EFI/Linux/a.efi\n")
    assert not uki.listed and uki.problems[0].reason == fmt.UKI_KEY_UNSUPPORTED
    both = parse("efi /a.efi\nlinux /vmlinuz\n")
    assert (both.loader, both.kernel) == ("linux", "/vmlinuz")
    assert any("both linux and efi" in n for n in both.notes)
    above = parse("linux /../vmlinuz\n")          # above the root: never opens
    assert not above.listed and above.kernel is None
    assert above.problems[0].reason == fmt.KERNEL_MISSING
    inside = parse("linux /a/./../vmlinuz\ninitrd /../x\n")
    assert inside.listed and not inside.stageable and inside.kernel == "/vmlinuz"
    assert inside.initrd == ()
    assert [p.reason for p in inside.problems] == [fmt.PATH_NOT_NORMALIZED] * 2
    assert parse("linux \\EFI\\debian\\vmlinuz\n").kernel == "/EFI/debian/vmlinuz"
    reserved = parse("linux /v\n", name="auto-windows.conf")
    assert [p.reason for p in reserved.problems] == [fmt.RESERVED_NAME]


def test_type1_text_is_read_like_a_c_string():
    cut = parse(b"title a\0\nlinux /v\n")
    assert cut.title == "a" and cut.problems[0].reason == fmt.NO_KERNEL
    assert any("NUL" in n for n in cut.notes)
    odd = parse(b"title \xff\xfe\nlinux /v\n")
    assert odd.title == "\ufffd\ufffd" and any("UTF-8" in n for n in odd.notes)
    astral = parse("title a\U0001F600b\nlinux /v\n")
    assert astral.title == "ab"


@given(st.binary(max_size=600))
def test_any_bytes_parse_to_an_entry(data):
    entry = parse(data)
    assert entry.id == "e.conf"
    assert entry.listed == (not any(p.hides for p in entry.problems))


# --------------------------------------------------------------------------- Type #2


def test_type2_title_version_sort_key():
    entry = fmt.type2_entry("Deb+2.efi", partition=fmt.ESP, source="/EFI/Linux/Deb+2.efi",
                            osrel='PRETTY_NAME="Debian 12"\nID=debian\nVERSION_ID=12\n'
                                  "VERSION=12 (bookworm)\n", cmdline="quiet", uname="6.1")
    assert (entry.title, entry.version, entry.sort_key) == ("Debian 12", "12 (bookworm)",
                                                           "debian")
    assert (entry.id, entry.tries_left, entry.options) == ("deb+2.efi", 2, "quiet")
    assert entry.signed_parts == ("image",) and entry.unsigned_parts == ()
    image = fmt.type2_entry("i.efi", partition=fmt.ESP, source="/EFI/Linux/i.efi",
                            osrel="IMAGE_ID=app\nIMAGE_VERSION=3\nID=debian\nNAME=App\n",
                            cmdline=None)
    assert (image.title, image.version, image.sort_key) == ("app", "3", "app")
    # The loader does not unquote like a shell: single quotes stay.
    quoted = fmt.type2_entry("q.efi", partition=fmt.ESP, source="/EFI/Linux/q.efi",
                             osrel="ID='q'\n", cmdline=None)
    assert quoted.sort_key == "'q'"
    for osrel, reason in ((None, fmt.NO_OSREL), ("", fmt.NO_OSREL),
                          ("VERSION_ID=1\n", fmt.NO_OS_NAME)):
        bad = fmt.type2_entry("b.efi", partition=fmt.ESP, source="/EFI/Linux/b.efi",
                              osrel=osrel, cmdline=None)
        assert [p.reason for p in bad.problems] == [reason] and not bad.listed
    boot = fmt.type2_entry("sd.efi", partition=fmt.ESP, source="/EFI/Linux/sd.efi",
                           osrel="ID=systemd-boot\n", cmdline=None, has_linux=False)
    assert boot.listed and not boot.stageable


# --------------------------------------------------------------------------- order


def entry(name: str, *, sort_key=None, machine_id=None, version=None) -> fmt.BootEntry:
    e = fmt.BootEntry(id=fmt.ascii_lower(name), file_name=name, type=fmt.TYPE1,
                      partition=fmt.ESP, source=f"/loader/entries/{name}", loader="linux",
                      kernel="/v", sort_key=sort_key, machine_id=machine_id, version=version,
                      counter=fmt.parse_counter(name, ".conf"))
    return e


def test_order_rules():
    es = [entry("old-b.conf"), entry("bad+0.conf", sort_key="a", version="99"),
          entry("a2.conf", sort_key="a", version="2"),
          entry("a1.conf", sort_key="a", version="10"),
          entry("m.conf", sort_key="a", machine_id="m", version="50"),
          entry("old-a.conf"), entry("B.conf", sort_key="B")]
    assert [e.id for e in fmt.order(es)] == [
        "b.conf", "a1.conf", "a2.conf", "m.conf", "old-b.conf", "old-a.conf", "bad+0.conf"]


def test_equal_entries_keep_their_order_and_counters_break_ties():
    same = [entry("x.conf"), entry("X.conf")]          # equal ids once lower-cased
    assert [e.file_name for e in fmt.order(same)] == ["x.conf", "X.conf"]
    assert [e.file_name for e in fmt.order(same[::-1])] == ["X.conf", "x.conf"]
    a, b = entry("k+1-5.conf"), entry("k+1-2.conf")
    a.id = b.id = "k.conf"                              # only the counters differ
    assert fmt.order([a, b]) == [b, a]                  # fewer tries done first
    c = entry("k+4.conf")
    c.id = "k.conf"
    assert fmt.order([a, b, c])[0] is c                 # more tries left first


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(("pattern", "name", "match"), [
    ("*", "", True), ("a*b*c", "axxbyyc", True), ("a*b*c", "axxbyy", False),
    ("?.conf", "a.conf", True), ("?.conf", "ab.conf", False),
    ("[ab]*", "b.conf", True), ("[a-c]x", "bx", True), ("[a-c]x", "dx", False),
    ("[]a]", "]", True), ("[a-c-f]", "-", True), ("[a-c-f]", "e", False),
    ("[a-c-f]", "f", True), ("[z-a]", "z", True), ("[z-a]", "m", False),
    ("[!e]", "!", True), ("[!e]", "d", False),          # no negation
    ("[ab", "a", False), ("a\\", "a", False),           # malformed: never matches
    ("\\*", "*", True), ("\\*", "a", False), ("[\\]]", "]", True),
])
def test_efi_fnmatch(pattern, name, match):
    assert fmt.fnmatch(pattern, name) is match


@given(st.text(alphabet="ab*?", max_size=8), st.text(alphabet="ab", max_size=10))
def test_fnmatch_agrees_with_glob_without_sets(pattern, name):
    assert fmt.fnmatch(pattern, name) == py_fnmatch.fnmatchcase(name, pattern)


def test_select_order_of_precedence():
    es = fmt.order([entry(f"{c}.conf", sort_key="os", version=str(i))
                    for i, c in enumerate("abcde", 1)])
    ids = [e.id for e in es]
    assert ids == ["e.conf", "d.conf", "c.conf", "b.conf", "a.conf"]

    def pick(with_oneshot=True, **kw):
        sel = fmt.select(es, fmt.LoaderSettings(**kw), oneshot=with_oneshot)
        return ids[sel.index], sel.reason

    assert pick() == ("e.conf", "first entry")
    assert pick(default_pattern="A.CONF") == ("a.conf", "loader.conf default")
    assert pick(default_pattern="a.conf", default_efivar="b*") == ("b.conf",
                                                                  "LoaderEntryDefault")
    assert pick(default_pattern="a.conf", default_efivar="b*", oneshot="c.conf") == (
        "c.conf", "LoaderEntryOneShot")
    assert pick(False, default_pattern="a.conf", oneshot="c.conf") == ("a.conf",
                                                                      "loader.conf default")
    assert pick(default_pattern="@SAVED", last_booted="b.conf")[0] == "b.conf"
    assert pick(default_efivar="@saved", last_booted="d.conf")[0] == "d.conf"
    # Both @saved: tried once, then the first entry.
    assert pick(default_efivar="@saved", default_pattern="@saved",
                last_booted="gone") == ("e.conf", "first entry")
    assert fmt.select([], fmt.LoaderSettings()).index is None


def test_loader_conf_default():
    assert fmt.loader_conf_default(b"timeout 3\ndefault a*\ndefault b*\n") == ("b*", [])
    assert fmt.loader_conf_default(b"default @Saved\n") == ("@Saved", [])
    pattern, notes = fmt.loader_conf_default(b"default x\ndefault @menu\ndefault\n")
    assert pattern == "x" and notes == [
        "default '@menu' ignored: the only special entry is @saved"]


# --------------------------------------------------------------------------- EFI variables


def test_efivar_strings():
    assert fmt.efivar_string("a.conf\0".encode("utf-16-le")) == "a.conf"
    assert fmt.efivar_string("a.conf".encode("utf-16-le")) == "a.conf"    # no NUL at the end
    assert fmt.efivar_string("a\0junk".encode("utf-16-le")) == "a"
    assert fmt.efivar_string(b"") == ""
    with pytest.raises(ValueError):
        fmt.efivar_string(b"abc")
    with pytest.raises(UnicodeDecodeError):
        fmt.efivar_string(struct.pack("<H", 0xD800) + b"a\0")
    assert fmt.efivar_strings("a.conf\0b.efi\0".encode("utf-16-le")) == ["a.conf", "b.efi"]
