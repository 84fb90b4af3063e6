"""Boot Loader Specification entries as systemd-boot 252 sees them (formats layer).

Pure: file names, file contents and already-open image descriptors in, records out.
Finding the partitions and reading the files is `platform.boot_entries`.

What systemd-boot 252 does (Debian 12's boot loader; src/boot/efi/boot.c of
systemd-stable 252.39, read from Debian's source package) and this module mirrors:

Type #1 (`loader/entries/*.conf`, config_entry_add_type1, line_get_key_value)
  - Lines split at CR or LF; leading/trailing blanks and tabs dropped; empty lines and
    lines starting with `#` skipped; the key ends at the first blank or tab and a line
    without a value is skipped; a value that starts and ends with `"` loses them.
  - `title sort-key version machine-id devicetree`: the last line wins. `linux` and
    `efi`: the last of the two wins (252; newer systemd marks an entry that mixes them
    bad). `initrd` repeats, in order. `options` repeat, joined by one space.
    `architecture` other than the firmware's (x64, aa64, ...) drops the entry.
  - An entry without `linux`/`efi`, or whose `linux`/`efi` file does not exist on its
    partition, is not listed at all. Files whose name starts with `.` or `auto-` are
    passed over. Paths: `\\` separates like `/` (convert_efi_path); the FAT driver
    resolves `..`, and a path climbing above the partition's root never opens.
  - Not read by 252: `devicetree-overlay` (bootctl lists it), `uki` (systemd 258),
    `uki-url` (258). We parse `devicetree-overlay` and `uki` so the listing can say why
    an entry is not what the admin expects; an entry that only has `uki` is not
    bootable for a 252 loader.

Type #2 (`EFI/Linux/*.efi`, config_entry_add_unified)
  - A PE image of the firmware's machine with a non-empty `.osrel` naming the OS:
    title = PRETTY_NAME ?: IMAGE_ID ?: NAME ?: ID, version = IMAGE_VERSION ?: VERSION ?:
    VERSION_ID ?: BUILD_ID, sort key = IMAGE_ID ?: ID (bootspec_pick_name_version_sort_key),
    options = `.cmdline` (mangled as the stub does). 252 knows no profiles: one entry per
    file (257 lists each `.profile` as `<id>@<profile>`).

Identity and boot counting (config_entry_parse_tries)
  - The entry id is the file name, lower-cased (ASCII), suffix and boot counter
    included: `Debian-6.1+3-0.conf` → `debian-6.1+3-0.conf`. (bootctl 252 shows the id
    with the counter stripped and the case kept: `Debian-6.1.conf`; patterns from
    `bootctl set-default`/`set-oneshot` are matched by systemd-boot against its own id.)
  - Counter: after the last `+` of the name, `LEFT[-DONE]` (decimal, each ≤ INT_MAX)
    followed by exactly the suffix (any case); DONE is 0 when absent. LEFT 0 = no tries
    left ("bad"): sorted last.

Order (config_entry_compare, an insertion sort — stable — over ESP `EFI/Linux`, ESP
`loader/entries`, XBOOTLDR `EFI/Linux`, XBOOTLDR `loader/entries`, in directory order)
  1. entries with tries left (or no counter) before those with none left;
  2. entries with a sort key before those without;
  3. both with a sort key: sort key ascending (UTF-16 strcmp), machine-id ascending (no
     machine-id first), version descending (`versions.compare`);
  4. id descending (`versions.compare`);
  5. both counted: more tries left first, then fewer tries done.

Default (config_default_entry_select; config_load_defaults)
  1. `LoaderEntryOneShot` (the loader deletes it as it boots), then
  2. `LoaderEntryDefault`, or — when that is `@saved` — `LoaderEntryLastBooted`, then
  3. loader.conf `default` (`@saved` → `LoaderEntryLastBooted`; other `@…` ignored),
  4. else the first entry. Each pattern is a glob (efi_fnmatch: `*`, `?`, `[a-z]` sets
     without negation, `\\` escapes), lower-cased, matched against the lower-cased ids in
     order; the first match wins. A pattern that matches nothing falls through.

Newer systemd-boot (main as of this writing) differs: `LoaderEntrySysFail` first after a
detected system failure, profiles, `uki`/`uki-url`, entries mixing `linux`/`efi`/`uki`
dropped, SMBIOS-provided entries, the `auto-` prefix matched case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from relaunchd.formats import versions

# systemd's vendor GUID of the boot loader interface (docs/BOOT_LOADER_INTERFACE.md).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
INT_MAX = 2**31 - 1
# EFI_MACHINE_TYPE_NAME by `uname -m` (src/fundamental/efi-loader... macro per arch).
EFI_MACHINE_NAMES = {"x86_64": "x64", "i686": "ia32", "i386": "ia32", "aarch64": "aa64",
                     "armv7l": "arm", "riscv64": "riscv64", "loongarch64": "loongarch64"}
# PE machine of each EFI machine name, for Type #2 images (sd-boot's verify_pe).
PE_MACHINES = {"x64": 0x8664, "ia32": 0x014C, "aa64": 0xAA64, "arm": 0x01C2,
               "riscv64": 0x5064, "loongarch64": 0x6264}

TYPE1 = "type1"
TYPE2 = "type2"
ESP = "esp"
XBOOTLDR = "xbootldr"

# Problem reasons: stable strings, they appear in `relaunchctl images --json`.
# Reasons in HIDDEN mean systemd-boot 252 would not list the entry at all.
NO_KERNEL = "no-kernel"                    # neither linux nor efi
KERNEL_MISSING = "kernel-missing"          # linux/efi names a file that is not there
FOREIGN_ARCHITECTURE = "foreign-architecture"
UKI_KEY_UNSUPPORTED = "uki-key-needs-systemd-258"
RESERVED_NAME = "reserved-name"            # auto-*: the loader's own entries
NOT_PE = "not-a-pe-image"
NO_OSREL = "no-osrel"
NO_OS_NAME = "no-os-name"
UNREADABLE = "unreadable"
NOT_REGULAR = "not-regular-file"
TOO_LARGE = "too-large"
HIDDEN = frozenset({NO_KERNEL, KERNEL_MISSING, FOREIGN_ARCHITECTURE, UKI_KEY_UNSUPPORTED,
                    RESERVED_NAME, NOT_PE, NO_OSREL, NO_OS_NAME, UNREADABLE, NOT_REGULAR,
                    TOO_LARGE})
# Listed (and possibly the default) but not something relaunchd can stage:
EFI_PROGRAM = "efi-program"                # `efi`: an EFI application, not a Linux kernel
NOT_A_UKI = "not-a-uki"                    # Type #2 PE without .linux (e.g. systemd-boot)
INITRD_MISSING = "initrd-missing"
PATH_NOT_NORMALIZED = "path-not-normalized"
WRITABLE_BY_NON_ROOT = "writable-by-non-root"   # a user could change what would be staged
NOT_VERIFIED = "not-verified"              # set by the platform once trust is known
UNSTAGEABLE = frozenset({EFI_PROGRAM, NOT_A_UKI, INITRD_MISSING, PATH_NOT_NORMALIZED,
                         WRITABLE_BY_NON_ROOT})


@dataclass(frozen=True)
class Problem:
    reason: str      # one of the constants above
    detail: str

    @property
    def hides(self) -> bool:
        """systemd-boot 252 would not list the entry."""
        return self.reason in HIDDEN


@dataclass(frozen=True)
class Counter:
    """A boot-counting suffix: `+LEFT[-DONE]` right before the file suffix."""

    left: int
    done: int
    stem: str        # the file name without counter and suffix ("debian-6.1")


@dataclass
class BootEntry:
    """One Type #1 or Type #2 entry, with the facts the loader orders it by."""

    id: str                        # systemd-boot's: file name, ASCII lower-cased
    file_name: str
    type: str                      # TYPE1 | TYPE2
    partition: str                 # ESP | XBOOTLDR
    source: str                    # path of the .conf/.efi relative to the partition
    loader: str | None = None      # "linux" | "efi" | "uki": what the entry starts
    title: str | None = None
    version: str | None = None
    sort_key: str | None = None
    machine_id: str | None = None
    architecture: str | None = None
    kernel: str | None = None      # partition-relative path (Type #2: the image itself)
    initrd: tuple[str, ...] = ()
    options: str | None = None
    devicetree: str | None = None
    devicetree_overlay: tuple[str, ...] = ()
    uname: str | None = None       # Type #2: .uname
    os_release: dict[str, str] = field(default_factory=dict)
    profiles: tuple[dict[str, str], ...] = ()
    counter: Counter | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        """The name without counter and suffix: kernel-install's `TOKEN-KVER`, and
        what bootctl 252 shows as the id without its suffix."""
        if self.counter is not None:
            return self.counter.stem
        return self.file_name.rsplit(".", 1)[0]

    @property
    def tries_left(self) -> int | None:
        return self.counter.left if self.counter else None

    @property
    def tries_done(self) -> int | None:
        return self.counter.done if self.counter else None

    @property
    def listed(self) -> bool:
        """systemd-boot 252 would show (and may boot) this entry."""
        return not any(p.hides for p in self.problems)

    @property
    def stageable(self) -> bool:
        """relaunchd could stage it (signature aside, which the platform judges)."""
        return self.listed and not any(p.reason in UNSTAGEABLE for p in self.problems)

    @property
    def signed_parts(self) -> tuple[str, ...]:
        """What a signature covers: a UKI (or EFI program) signs everything it carries;
        a Type #1 entry's initrd, options and device tree are signed by no one."""
        return ("kernel",) if self.type == TYPE1 and self.loader == "linux" else ("image",)

    @property
    def unsigned_parts(self) -> tuple[str, ...]:
        if self.type == TYPE2 or self.loader != "linux":
            return ()
        parts = [name for name, present in (("initrd", self.initrd),
                                              ("options", self.options),
                                              ("devicetree", self.devicetree)) if present]
        return tuple(parts)

    def problem(self, reason: str, detail: str) -> None:
        self.problems.append(Problem(reason, detail))


# --------------------------------------------------------------------------- names


def ascii_lower(text: str) -> str:
    """strtolower16: only A-Z change."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def parse_counter(file_name: str, suffix: str) -> Counter | None:
    """systemd-boot's boot counter of `file_name` ending in `suffix` (".conf"/".efi")."""
    plus = file_name.rfind("+")
    if plus < 0:
        return None
    rest = file_name[plus + 1:]
    m = re.match(r"([0-9]+)(?:-([0-9]+))?", rest, re.ASCII)
    if not m:
        return None
    left = int(m.group(1))
    done = int(m.group(2)) if m.group(2) is not None else 0
    if left > INT_MAX or done > INT_MAX:
        return None
    # "-" not followed by digits: parse_number16 fails and there is no counter at all.
    if m.group(2) is None and rest[m.end():].startswith("-"):
        return None
    if ascii_lower(rest[m.end():]) != ascii_lower(suffix):
        return None          # the counter is in the middle of the name
    return Counter(left=left, done=done, stem=file_name[:plus])


def type1_candidate(file_name: str) -> bool:
    """The names in loader/entries/ that are entries at all (dot files are not)."""
    return not file_name.startswith(".") and ascii_lower(file_name).endswith(".conf")


def type2_candidate(file_name: str) -> bool:
    """The names in EFI/Linux/ that are entries at all (dot files are not)."""
    return not file_name.startswith(".") and ascii_lower(file_name).endswith(".efi")


def _reserved(entry: BootEntry) -> None:
    # 252 skips "auto-*" (case-sensitive); newer versions any case.
    if entry.file_name.startswith("auto-"):
        entry.problem(RESERVED_NAME, "names starting with auto- are the loader's own "
                                     "entries: it passes over the file")


# --------------------------------------------------------------------------- Type #1


def key_values(text: str, separators: str = " \t") -> list[tuple[str, str]]:
    """systemd-boot's line_get_key_value (see module doc): `separators` is " \t" for
    entries and loader.conf, "=" for the `.osrel` of a Type #2 image."""
    pairs: list[tuple[str, str]] = []
    sep = re.escape(separators)
    for raw in re.split(r"[\r\n]", text):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        m = re.match(rf"([^{sep}]*)[{sep}]+(.*)\Z", line, re.DOTALL)
        if not m:
            continue                         # a key without a value
        key, value = m.group(1), m.group(2)
        if value.startswith('"') and line.endswith('"'):
            value = value[1:-1]
        pairs.append((key, value))
    return pairs


def decode_text(data: bytes) -> tuple[str, list[str]]:
    """Entry and loader.conf bytes as text, as the loader sees them: up to the first NUL
    (it works on C strings), UTF-8 with replacement. Returns (text, notes)."""
    notes = []
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
        notes.append("contains a NUL byte: the loader reads only what comes before it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        notes.append("not valid UTF-8: undecodable bytes shown as U+FFFD")
        text = data.decode("utf-8", "replace")
    # xstrn8_to_16 keeps only characters that fit one UTF-16 unit.
    bmp = "".join(ch for ch in text if ord(ch) <= 0xFFFF)
    if len(bmp) != len(text):
        notes.append("characters beyond U+FFFF dropped, as the loader drops them")
    return bmp, notes


@dataclass(frozen=True)
class EntryPath:
    """A path named by a Type #1 entry, as the loader's file system driver resolves it
    on the entry's partition."""

    path: str | None       # "/a/b"; None: it leaves the partition's root (never opens)
    plain: bool            # no `.`/`..` component, no trailing `/` (bootctl's mangle_path)


def partition_path(value: str) -> EntryPath:
    """`\\` separates like `/` (convert_efi_path turns `/` into `\\`); `.` and `..` are
    resolved as the FAT driver resolves them: `..` above the root fails to open (seen
    with systemd-boot 252 on OVMF, tests/vm/test_boot_entries.py), elsewhere it goes up."""
    raw = value.replace("\\", "/")
    parts: list[str] = []
    plain = not raw.endswith("/")
    for part in raw.split("/"):
        if part in ("", "."):
            plain = plain and part == ""
            continue
        if part == "..":
            plain = False
            if not parts:
                return EntryPath(None, False)
            parts.pop()
            continue
        parts.append(part)
    return EntryPath("/" + "/".join(parts) if parts else None, plain and bool(parts))


def parse_type1(file_name: str, data: bytes, *, partition: str, source: str,
                efi_machine: str) -> BootEntry:
    """A Type #1 entry from its file name and contents. Existence of the files it
    names is the platform's to check (`KERNEL_MISSING`, `INITRD_MISSING`)."""
    entry = BootEntry(id=ascii_lower(file_name), file_name=file_name, type=TYPE1,
                      partition=partition, source=source,
                      counter=parse_counter(file_name, ".conf"))
    _reserved(entry)
    text, entry.notes = decode_text(data)
    initrd: list[str] = []
    overlays: list[str] = []
    options: list[str] = []
    executable: list[tuple[str, str]] = []   # ("linux"|"efi", value) in file order
    uki: str | None = None

    def path_of(key: str, value: str) -> str | None:
        resolved = partition_path(value)
        if resolved.path is None:
            reason = KERNEL_MISSING if key in ("linux", "efi") else PATH_NOT_NORMALIZED
            entry.problem(reason, f"{key} {value!r}: leaves the partition's root, the loader "
                                  "cannot open it")
        elif not resolved.plain:
            entry.problem(PATH_NOT_NORMALIZED, f"{key} {value!r}: not a plain path (trailing "
                                               "/, . or ..): relaunchd does not stage it")
        return resolved.path

    for key, value in key_values(text):
        if key == "title":
            entry.title = value
        elif key == "sort-key":
            entry.sort_key = value
        elif key == "version":
            entry.version = value
        elif key == "machine-id":
            entry.machine_id = value
        elif key == "architecture":
            entry.architecture = value
            if ascii_lower(value) != ascii_lower(efi_machine):
                entry.problem(FOREIGN_ARCHITECTURE,
                              f"architecture {value}: this firmware is {efi_machine}")
                break                                # the loader stops reading here
        elif key in ("linux", "efi"):
            executable.append((key, value))
        elif key == "uki":
            uki = value
        elif key == "initrd":
            initrd.append(value)
        elif key == "options":
            options.append(value)
        elif key == "devicetree":
            entry.devicetree = value
        elif key == "devicetree-overlay":
            overlays.extend(value.split())
        else:
            entry.notes.append(f"unknown key {key!r} ignored, as the loader does")

    if len({k for k, _ in executable}) > 1:
        entry.notes.append("has both linux and efi: systemd-boot 252 uses the last one, "
                           "newer versions refuse the entry")
    if executable:
        entry.loader, value = executable[-1]
        entry.kernel = path_of(entry.loader, value)
        if entry.loader == "efi":
            entry.problem(EFI_PROGRAM, f"efi {value}: an EFI program, not a Linux kernel")
    elif uki is not None:
        entry.loader = "uki"
        entry.kernel = path_of("uki", uki)
        entry.problem(UKI_KEY_UNSUPPORTED, "only a `uki` key: systemd-boot 252 ignores it and "
                                           "does not list the entry (258 does)")
    elif not any(p.reason == FOREIGN_ARCHITECTURE for p in entry.problems):
        entry.problem(NO_KERNEL, "neither linux nor efi: the loader does not list it")
    if uki is not None and executable:
        entry.notes.append("`uki` ignored: systemd-boot 252 boots the linux/efi line")
    entry.initrd = tuple(p for p in (path_of("initrd", v) for v in initrd) if p)
    entry.options = " ".join(options) if options else None
    if entry.devicetree is not None:
        entry.devicetree = path_of("devicetree", entry.devicetree)
    if overlays:
        entry.devicetree_overlay = tuple(p for p in (path_of("devicetree-overlay", v)
                                                     for v in overlays) if p)
        entry.notes.append("devicetree-overlay is not applied by systemd-boot 252")
    return entry


# --------------------------------------------------------------------------- Type #2


def loader_os_release(text: str) -> dict[str, str]:
    """`.osrel` as systemd-boot 252 reads it: line_get_key_value with "=", so only
    double quotes around a whole value go, and nothing is unescaped (bootctl's
    parse_env_file unquotes like a shell; titles may differ, `ID='x'` sorts differently)."""
    decoded, _ = decode_text(text.encode("utf-8", "surrogatepass"))
    return dict(key_values(decoded, "="))


def pick_name_version_sort_key(osrel: dict[str, str]) -> tuple[str | None, str | None,
                                                              str | None]:
    """bootspec_pick_name_version_sort_key: (title, version, sort key)."""
    def first(*keys: str) -> str | None:
        return next((osrel[k] for k in keys if k in osrel), None)

    return (first("PRETTY_NAME", "IMAGE_ID", "NAME", "ID"),
            first("IMAGE_VERSION", "VERSION", "VERSION_ID", "BUILD_ID"),
            first("IMAGE_ID", "ID"))


def type2_entry(file_name: str, *, partition: str, source: str,
                osrel: str | None, cmdline: str | None, uname: str | None = None,
                profiles: Sequence[dict[str, str]] = (), has_linux: bool = True) -> BootEntry:
    """A Type #2 entry from the facts of its image (read by the caller: `.osrel`,
    `.cmdline` mangled as the stub does, `.uname`, `.profile`s)."""
    entry = BootEntry(id=ascii_lower(file_name), file_name=file_name, type=TYPE2,
                      partition=partition, source=source, loader="uki", kernel=source,
                      counter=parse_counter(file_name, ".efi"), uname=uname,
                      profiles=tuple(profiles), options=cmdline)
    _reserved(entry)
    if not osrel:
        entry.problem(NO_OSREL, "no (or an empty) .osrel section: the loader does not list it")
        return entry
    entry.os_release = loader_os_release(osrel)
    title, version, sort_key = pick_name_version_sort_key(entry.os_release)
    if title is None:
        entry.problem(NO_OS_NAME, ".osrel has none of PRETTY_NAME, IMAGE_ID, NAME, ID: the "
                                  "loader does not list it")
    entry.title, entry.version, entry.sort_key = title, version, sort_key
    if not has_linux:
        entry.problem(NOT_A_UKI, "a PE image with .osrel but no .linux (systemd-boot itself?)")
    if len(profiles) > 1:
        entry.notes.append(f"{len(profiles)} profiles: systemd-boot 252 shows one entry and "
                           "the stub boots profile 0")
    return entry


# --------------------------------------------------------------------------- order


def _utf16_key(text: str | None) -> bytes | None:
    # strcmp16 compares UTF-16 code units; big-endian bytes compare the same way.
    return None if text is None else text.encode("utf-16-be", "surrogatepass")


def _cmp(a, b) -> int:
    """CMP() with NULL (None) first, as strcmp16/strcmp_ptr order it."""
    if a is None or b is None:
        return (a is not None) - (b is not None)
    return (a > b) - (a < b)


def compare(a: BootEntry, b: BootEntry) -> int:
    """config_entry_compare: < 0 when `a` comes first."""
    r = _cmp(a.tries_left == 0, b.tries_left == 0)
    if r:
        return r
    r = _cmp(a.sort_key is None, b.sort_key is None)
    if r:
        return r
    if a.sort_key is not None and b.sort_key is not None:
        r = (_cmp(_utf16_key(a.sort_key), _utf16_key(b.sort_key))
             or _cmp(_utf16_key(a.machine_id), _utf16_key(b.machine_id))
             or -versions.compare(a.version, b.version))
        if r:
            return r
    r = -versions.compare(a.id, b.id)
    if r:
        return r
    if a.counter is None or b.counter is None:
        return 0
    return -_cmp(a.counter.left, b.counter.left) or _cmp(a.counter.done, b.counter.done)


def order(entries: Sequence[BootEntry]) -> list[BootEntry]:
    """The listed entries in the loader's order: its insertion sort, so entries that
    compare equal keep the order they were found in."""
    result: list[BootEntry] = []
    for entry in entries:
        if not entry.listed:
            continue
        k = len(result)
        while k > 0 and compare(result[k - 1], entry) > 0:
            k -= 1
        result.insert(k, entry)
    return result


# --------------------------------------------------------------------------- default


@dataclass(frozen=True)
class LoaderSettings:
    """What the loader reads before it picks an entry. None: not set."""

    default_pattern: str | None = None   # loader.conf `default`
    oneshot: str | None = None           # EFI variable LoaderEntryOneShot
    default_efivar: str | None = None    # EFI variable LoaderEntryDefault
    last_booted: str | None = None       # EFI variable LoaderEntryLastBooted (@saved)


@dataclass(frozen=True)
class EntryChoice:
    """The entry systemd-boot boots next (or by default), and what chose it."""

    index: int | None        # into the ordered list; None: no entries
    reason: str              # what chose it ("LoaderEntryOneShot", ..., "first entry")
    pattern: str | None = None


def loader_conf_default(data: bytes) -> tuple[str | None, list[str]]:
    """The `default` of a loader.conf (the last valid one), and notes on what was
    ignored (config_defaults_load_from_file)."""
    text, notes = decode_text(data)
    pattern: str | None = None
    for key, value in key_values(text):
        if key != "default":
            continue
        if value.startswith("@") and ascii_lower(value) != "@saved":
            notes.append(f"default {value!r} ignored: the only special entry is @saved")
            continue
        pattern = value
    return pattern, notes


def fnmatch(pattern: str, name: str) -> bool:
    """efi_fnmatch (src/boot/efi/efi-string.c): `*`, `?`, `[...]` (ranges, `]` first is
    literal, no negation, ranges do not chain), `\\` escapes; an unterminated set or a
    trailing backslash never matches."""
    tokens = _glob_tokens(pattern)
    if tokens is None:
        return False
    # Dynamic programming over (token, position): no backtracking blow-up.
    reach = {0}
    for kind, arg in tokens:
        if kind == "*":
            start = min(reach) if reach else None
            reach = set(range(start, len(name) + 1)) if start is not None else set()
            continue
        reach = {i + 1 for i in reach if i < len(name) and _token_matches(kind, arg, name[i])}
        if not reach:
            return False
    return len(name) in reach


def _token_matches(kind: str, arg, ch: str) -> bool:
    if kind == "?":
        return True
    if kind == "=":
        return ch == arg
    return any(lo <= ch <= hi for lo, hi in arg)


def _glob_tokens(pattern: str) -> list[tuple[str, object]] | None:
    tokens: list[tuple[str, object]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern):
                return None
            tokens.append(("=", pattern[i + 1]))
            i += 2
        elif c == "?":
            tokens.append(("?", None))
            i += 1
        elif c == "*":
            if not tokens or tokens[-1][0] != "*":
                tokens.append(("*", None))
            i += 1
        elif c == "[":
            ranges: list[tuple[str, str]] = []
            i += 1
            first, can_range = True, True
            while True:
                if i >= len(pattern):
                    return None
                c = pattern[i]
                if c == "\\":
                    if i + 1 >= len(pattern):
                        return None
                    ranges.append((pattern[i + 1], pattern[i + 1]))
                    i += 2
                    first, can_range = False, True
                    continue
                if c == "]" and not first:
                    i += 1
                    break
                if (c == "-" and can_range and not first and i + 1 < len(pattern)
                        and pattern[i + 1] != "]"):
                    low = ranges[-1][0]     # the character before '-' (still a member)
                    j = i + 1
                    if pattern[j] == "\\":
                        j += 1
                    if j >= len(pattern):
                        return None
                    ranges.append((low, pattern[j]))
                    i = j + 1
                    first, can_range = False, False
                    continue
                ranges.append((c, c))
                i += 1
                first, can_range = False, True
            tokens.append(("[", ranges))
        else:
            tokens.append(("=", c))
            i += 1
    return tokens


def find(ordered: Sequence[BootEntry], pattern: str | None) -> int | None:
    """config_entry_find: the first entry whose id the lower-cased pattern matches."""
    if pattern is None:
        return None
    folded = ascii_lower(pattern)
    return next((i for i, e in enumerate(ordered) if fnmatch(folded, e.id)), None)


def select(ordered: Sequence[BootEntry], settings: LoaderSettings, *,
           oneshot: bool = True) -> EntryChoice:
    """The entry the loader boots when nobody presses a key; `oneshot=False`: the one it
    boots once no one-shot is pending (what `bootctl` marks "default")."""
    if not ordered:
        return EntryChoice(None, "no entries")
    low = {k: ascii_lower(v) if v is not None else None
           for k, v in (("conf", settings.default_pattern), ("efi", settings.default_efivar))}
    saved_conf, saved_efi = low["conf"] == "@saved", low["efi"] == "@saved"
    steps: list[tuple[str, str | None]] = []
    if oneshot:
        steps.append(("LoaderEntryOneShot", settings.oneshot))
    if saved_efi:
        steps.append(("LoaderEntryDefault @saved → LoaderEntryLastBooted", settings.last_booted))
    else:
        steps.append(("LoaderEntryDefault", settings.default_efivar))
    if saved_conf:
        if not saved_efi:    # "no need to do the same thing twice"
            steps.append(("loader.conf default @saved → LoaderEntryLastBooted",
                          settings.last_booted))
    else:
        steps.append(("loader.conf default", settings.default_pattern))
    for reason, pattern in steps:
        i = find(ordered, pattern)
        if i is not None:
            return EntryChoice(i, reason, pattern)
    return EntryChoice(0, "first entry")


def efivar_string(payload: bytes) -> str:
    """A string EFI variable's payload (after the 4 attribute bytes): UTF-16LE, ended by
    the first NUL or the end. Raises ValueError for an odd length or bad UTF-16."""
    if len(payload) % 2:
        raise ValueError(f"{len(payload)} bytes: not UTF-16")
    units = [payload[i:i + 2] for i in range(0, len(payload), 2)]
    end = units.index(b"\0\0") if b"\0\0" in units else len(units)
    return b"".join(units[:end]).decode("utf-16-le")


def efivar_strings(payload: bytes) -> list[str]:
    """A list of NUL-terminated UTF-16LE strings (LoaderEntries)."""
    if len(payload) % 2:
        raise ValueError(f"{len(payload)} bytes: not UTF-16")
    text = payload.decode("utf-16-le")
    return [s for s in text.split("\0") if s]
