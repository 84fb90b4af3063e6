"""The boot loader entries of this machine, and the one it would boot next
(platform layer).

`list_entries` reads the ESP and XBOOTLDR (`boot_partition`) the way systemd-boot
252 does — Type #2 images in `EFI/Linux/`, Type #1 entries in `loader/entries/`,
ESP first — together with `loader/loader.conf` and the boot loader's EFI variables
(read-only, from efivarfs), and orders and picks with `formats.boot_entries`.
Given trusted certificates it also says whether each entry's kernel verifies:
the UKI of a Type #2 entry, the `linux` image of a Type #1 entry (a
distribution-signed vmlinuz is an Authenticode-signed PE like a UKI's `.linux`).
That verdict is about the file as it is now; staging verifies its own sealed copy
again.

A malformed entry, an unreadable file or a garbled EFI variable becomes a problem
or note on that entry or on the listing, never an exception: the listing always
completes. `next_boot` and `find` raise named errors (NoBootEntry) when nothing
fits; `require_stageable` raises InvalidBootEntry naming every reason.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import InvalidBootEntry, InvalidImage, NoBootEntry
from relaunchd.formats import boot_entries as fmt
from relaunchd.formats import pe, uki
from relaunchd.formats.signature_report import SignatureReport
from relaunchd.platform.boot_partition import (
    Partition,
    PartitionDir,
    PartitionError,
    Partitions,
    find_partitions,
)
from relaunchd.platform.sysroot import SysRoot

EFIVARS = "/sys/firmware/efi/efivars"
ENTRY_LIMIT = 1 << 20          # bootctl's LONG_LINE_MAX; real entries are < 1 KiB
LOADER_CONF_LIMIT = 1 << 20
EFIVAR_LIMIT = 64 << 10
LOADER_VARIABLES = ("LoaderEntryOneShot", "LoaderEntryDefault", "LoaderEntryLastBooted",
                    "LoaderEntrySelected", "LoaderInfo")


@dataclass
class ListedEntry:
    """An entry with where it lives and what the listing decided about it."""

    entry: fmt.BootEntry
    partition: Partition
    position: int | None = None          # in the loader's order; None: not listed
    default: bool = False                # booted when no one-shot is pending
    next_boot: bool = False              # booted next (one-shot included)
    verification: SignatureReport | None = None

    @property
    def id(self) -> str:
        return self.entry.id

    def path(self, rel: str | None) -> str | None:
        if rel is None:
            return None
        return self.partition.path.rstrip("/") + rel

    @property
    def verified(self) -> bool | None:
        return None if self.verification is None else self.verification.verified

    def staged_record(self) -> dict[str, Any]:
        """What a staged image records about the entry it came from (StagedImage
        `entry`): enough to name it, and to match it when its kernel is removed."""
        e = self.entry
        return {"id": e.id, "stem": e.stem, "type": e.type, "loader": e.loader,
                "title": e.title, "version": e.version, "uname": e.uname,
                "path": self.path(e.source), "kernel": self.path(e.kernel),
                "initrd": [self.path(p) for p in e.initrd],
                "signed": list(e.signed_parts), "unsigned": list(e.unsigned_parts)}

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        data: dict[str, Any] = {
            "id": e.id, "file_name": e.file_name, "stem": e.stem,
            "type": e.type, "loader": e.loader, "partition": e.partition,
            "path": self.path(e.source), "title": e.title, "version": e.version,
            "sort_key": e.sort_key, "machine_id": e.machine_id,
            "architecture": e.architecture, "kernel": self.path(e.kernel),
            "initrd": [self.path(p) for p in e.initrd], "options": e.options,
            "devicetree": self.path(e.devicetree),
            "devicetree_overlay": [self.path(p) for p in e.devicetree_overlay],
            "uname": e.uname, "tries_left": e.tries_left, "tries_done": e.tries_done,
            "position": self.position, "default": self.default, "next_boot": self.next_boot,
            "listed": e.listed, "stageable": e.stageable,
            "signed_parts": list(e.signed_parts), "unsigned_parts": list(e.unsigned_parts),
            "problems": [{"reason": p.reason, "detail": p.detail} for p in e.problems],
            "notes": list(e.notes),
        }
        if e.type == fmt.TYPE2:
            data["os_release"] = dict(e.os_release)
            data["profiles"] = [dict(p) for p in e.profiles]
        v = self.verification
        data["verified"] = None if v is None else v.verified
        data["verified_by"] = None if v is None else v.verified_by
        data["signers"] = [] if v is None else list(v.signers)
        data["verification_reasons"] = [] if v is None else list(v.reasons)
        return data


@dataclass
class Listing:
    """Every entry found: the listed ones in the loader's order, then the ones the
    loader would not show."""

    partitions: Partitions
    entries: list[ListedEntry]
    settings: fmt.LoaderSettings
    next_boot_reason: str | None = None
    default_reason: str | None = None
    loader: str | None = None            # LoaderInfo ("systemd-boot 252.39-1~deb12u2")
    selected: str | None = None          # LoaderEntrySelected: what booted this time
    notes: list[str] = field(default_factory=list)

    @property
    def next_boot(self) -> ListedEntry | None:
        return next((e for e in self.entries if e.next_boot), None)

    @property
    def default(self) -> ListedEntry | None:
        return next((e for e in self.entries if e.default), None)

    def to_json(self) -> dict[str, Any]:
        p = self.partitions
        return {
            "esp": p.esp.path if p.esp else None,
            "xbootldr": p.xbootldr.path if p.xbootldr else None,
            "loader": self.loader, "selected": self.selected,
            "oneshot": self.settings.oneshot, "default_efivar": self.settings.default_efivar,
            "default_pattern": self.settings.default_pattern,
            "next_boot": self.next_boot.id if self.next_boot else None,
            "next_boot_reason": self.next_boot_reason,
            "default": self.default.id if self.default else None,
            "default_reason": self.default_reason,
            "notes": list(p.notes) + self.notes,
            "entries": [e.to_json() for e in self.entries],
        }


def efi_machine() -> str:
    """This machine's EFI_MACHINE_TYPE_NAME (x64, aa64, ...)."""
    machine = os.uname().machine
    return fmt.EFI_MACHINE_NAMES.get(machine, machine)


def read_loader_variable(root: SysRoot, name: str) -> tuple[str | None, str | None]:
    """(value, problem) of a string variable of systemd's loader interface: efivarfs
    gives 4 attribute bytes, then UTF-16LE up to a NUL. Absent → (None, None)."""
    raw = root.read_bytes(f"{EFIVARS}/{name}-{fmt.LOADER_GUID}", limit=EFIVAR_LIMIT)
    if raw.error == "not-present":
        return None, None
    if not raw.ok or raw.value is None:
        return None, f"EFI variable {name}: {raw.error} ({raw.detail})"
    if len(raw.value) < 4:
        return None, f"EFI variable {name}: {len(raw.value)} bytes, shorter than its attributes"
    try:
        return fmt.efivar_string(raw.value[4:]), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"EFI variable {name}: not a UTF-16 string ({exc})"


def loader_settings(root: SysRoot, esp: PartitionDir | None,
                    notes: list[str]) -> tuple[fmt.LoaderSettings, dict[str, str | None]]:
    """loader.conf's default and the loader's EFI variables."""
    values: dict[str, str | None] = {}
    for name in LOADER_VARIABLES:
        value, problem = read_loader_variable(root, name)
        values[name] = value
        if problem:
            notes.append(problem + ": ignored")
    pattern = None
    if esp is not None:
        try:
            pattern, conf_notes = fmt.loader_conf_default(
                esp.read("/loader/loader.conf", LOADER_CONF_LIMIT))
            notes.extend(f"loader.conf: {n}" for n in conf_notes)
        except PartitionError as exc:
            if exc.reason != "missing":
                notes.append(f"loader.conf ignored: {exc.detail}")
    settings = fmt.LoaderSettings(default_pattern=pattern,
                                  oneshot=values["LoaderEntryOneShot"],
                                  default_efivar=values["LoaderEntryDefault"],
                                  last_booted=values["LoaderEntryLastBooted"])
    return settings, values


# --------------------------------------------------------------------------- reading


def _read_type2(part: PartitionDir, name: str, machine: str) -> fmt.BootEntry:
    rel = f"/EFI/Linux/{name}"
    role = part.partition.role

    def failed(reason: str, detail: str) -> fmt.BootEntry:
        entry = fmt.type2_entry(name, partition=role, source=rel, osrel=None, cmdline=None)
        entry.problems = [fmt.Problem(reason, detail)]
        return entry

    try:
        fd = part.open_file(rel)
    except PartitionError as exc:
        return failed(exc.reason if exc.reason != "missing" else fmt.UNREADABLE, exc.detail)
    try:
        size = os.fstat(fd).st_size
        try:
            headers = pe.parse_headers(pe.FileRange(fd, 0, size), confirm=False)
        except InvalidImage as exc:
            return failed(fmt.NOT_PE, f"{part.platform_path(rel)}: {exc}")
        want = fmt.PE_MACHINES.get(machine)
        if want is not None and headers.machine != want:
            return failed(fmt.FOREIGN_ARCHITECTURE, f"built for {headers.machine_name}, this "
                                                    f"firmware is {machine}")
        osrel, has_linux = _loader_osrel(fd, headers)
        cmdline = uname = None
        profiles: list[dict[str, str]] = []
        notes: list[str] = []
        if has_linux:
            try:
                image = uki.UkiImage(fd, part.platform_path(rel), headers, owns_fd=False,
                                     confirmed=False)
                resolved = image.resolve()
                cmdline, uname = image.cmdline(resolved), image.uname(resolved)
                profiles = image.all_profiles()
            except InvalidImage as exc:
                notes.append(f"sections unreadable as a UKI: {exc}")
        entry = fmt.type2_entry(name, partition=role, source=rel, osrel=osrel,
                                cmdline=cmdline, uname=uname, profiles=profiles,
                                has_linux=has_linux)
        entry.notes.extend(notes)
        return entry
    except (InvalidImage, OSError) as exc:
        return failed(fmt.UNREADABLE, f"{part.platform_path(rel)}: {exc}")
    finally:
        os.close(fd)


def _loader_osrel(fd: int, headers: pe.PeHeaders) -> tuple[str | None, bool]:
    """`.osrel` as the loader finds it (pe_file_locate_sections: the last section whose
    name starts with ".osrel"), and whether the image has a `.linux`."""
    osrel = None
    for section in headers.sections:
        if section.name.startswith(".osrel"):
            osrel = section
    has_linux = any(s.name == ".linux" for s in headers.sections)
    if osrel is None or osrel.virtual_size == 0:
        return None, has_linux
    if osrel.payload_size > uki.TEXT_SECTION_LIMIT:
        raise InvalidImage(f".osrel is {osrel.payload_size} bytes, over the "
                           f"{uki.TEXT_SECTION_LIMIT}-byte limit")
    data = pe.FileRange(fd, 0, headers.file_size).pread(osrel.raw_offset, osrel.payload_size)
    return data.split(b"\0", 1)[0].decode("utf-8", "replace"), has_linux


def _read_type1(part: PartitionDir, name: str, machine: str) -> fmt.BootEntry:
    rel = f"/loader/entries/{name}"
    role = part.partition.role
    try:
        data = part.read(rel, ENTRY_LIMIT)
    except PartitionError as exc:
        entry = fmt.BootEntry(id=fmt.ascii_lower(name), file_name=name, type=fmt.TYPE1,
                              partition=role, source=rel)
        entry.problem(exc.reason if exc.reason != "missing" else fmt.UNREADABLE, exc.detail)
        return entry
    entry = fmt.parse_type1(name, data, partition=role, source=rel, efi_machine=machine)
    # The loader lists an entry only if its linux/efi file opens (config_entry_add_type1).
    if entry.kernel is not None and entry.listed:
        missing = part.exists(entry.kernel)
        if missing is not None:
            entry.problem(fmt.KERNEL_MISSING, f"{entry.loader} {missing.detail}: the loader "
                                              "does not list it")
    for initrd in entry.initrd:
        missing = part.exists(initrd)
        if missing is not None:
            entry.problem(fmt.INITRD_MISSING, f"initrd {missing.detail}")
    return entry


def _scan(part: PartitionDir, machine: str, notes: list[str]) -> list[fmt.BootEntry]:
    """One partition's entries in the loader's discovery order: EFI/Linux, then
    loader/entries, each in directory order."""
    found: list[fmt.BootEntry] = []
    for directory, candidate, read in (("/EFI/Linux", fmt.type2_candidate, _read_type2),
                                       ("/loader/entries", fmt.type1_candidate, _read_type1)):
        try:
            names = part.listdir(directory)
        except PartitionError as exc:
            notes.append(f"{part.platform_path(directory)} not read: {exc.detail}")
            continue
        for name, is_file in names:
            if is_file and candidate(name):
                found.append(read(part, name, machine))
    return found


def _mark_writable(part: PartitionDir, entry: fmt.BootEntry) -> None:
    if not entry.listed:
        return
    for rel in (entry.source, entry.kernel, *entry.initrd):
        if rel is None:
            continue
        try:
            where = part.writable_by_others(rel)
        except PartitionError:
            continue
        if where is not None:
            entry.problem(fmt.WRITABLE_BY_NON_ROOT,
                          f"{where} is owned or writable by a non-root user")
            return


def _verify(part: PartitionDir, entry: fmt.BootEntry, trusted: Sequence) -> SignatureReport:
    """Authenticode of the entry's kernel image (Type #2: the UKI; Type #1: `linux`)."""
    from relaunchd.formats import authenticode

    assert entry.kernel is not None
    try:
        fd = part.open_file(entry.kernel)
    except PartitionError as exc:
        return _unverified(exc.detail)
    try:
        headers = pe.parse_headers(pe.FileRange(fd, 0, os.fstat(fd).st_size))
        return authenticode.verify_file(fd, headers, list(trusted))
    except InvalidImage as exc:
        return _unverified(f"{part.platform_path(entry.kernel)}: not a PE image ({exc}); an "
                           "unsigned kernel cannot verify")
    finally:
        os.close(fd)


def _unverified(reason: str) -> SignatureReport:
    return SignatureReport(signed=False, signers=[], digest_ok=[], verified=False,
                           verified_by=None, reasons=[reason])


# --------------------------------------------------------------------------- listing


def list_entries(root: SysRoot, *, esp: str | None = None, xbootldr: str | None = None,
                 trusted: Sequence | None = None, machine: str | None = None) -> Listing:
    """Every entry on the ESP and XBOOTLDR under `root`, ordered, with the default and
    the next boot marked; `trusted` (x509 certificates): also verify each kernel."""
    partitions = find_partitions(root, esp=esp, xbootldr=xbootldr)
    machine = machine or efi_machine()
    notes: list[str] = []
    opened: list[PartitionDir] = []
    try:
        for partition in (partitions.esp, partitions.xbootldr):
            if partition is None:
                continue
            try:
                opened.append(PartitionDir(root, partition))
            except PartitionError as exc:
                notes.append(f"{partition.role} {partition.path} not read: {exc.detail}")
        esp_dir = next((d for d in opened if d.partition.role == "esp"), None)
        settings, values = loader_settings(root, esp_dir, notes)
        found: list[tuple[fmt.BootEntry, PartitionDir]] = []
        for part in opened:
            found.extend((entry, part) for entry in _scan(part, machine, notes))
        for entry, part in found:
            _mark_writable(part, entry)
        listing = _arrange(found, settings, partitions, notes)
        listing.loader = values["LoaderInfo"]
        listing.selected = values["LoaderEntrySelected"]
        if listing.loader is not None and not listing.loader.startswith("systemd-boot"):
            notes.append(f"the boot loader is {listing.loader!r}, not systemd-boot: the order "
                         "and default follow systemd-boot 252's rules")
        if trusted is not None:
            by_entry = {id(e): p for e, p in found}
            for listed in listing.entries:
                entry = listed.entry
                if entry.kernel is None or not entry.listed or entry.loader == "efi":
                    continue
                listed.verification = _verify(by_entry[id(entry)], entry, trusted)
                if not listed.verification.verified:
                    entry.problem(fmt.NOT_VERIFIED, "; ".join(listed.verification.reasons)
                                  or "no signature verifies")
        return listing
    finally:
        for part in opened:
            part.close()


def _arrange(found: list[tuple[fmt.BootEntry, PartitionDir]], settings: fmt.LoaderSettings,
             partitions: Partitions, notes: list[str]) -> Listing:
    ordered = fmt.order([entry for entry, _ in found])
    by_entry = {id(e): p.partition for e, p in found}
    listed = [ListedEntry(e, by_entry[id(e)], position=i) for i, e in enumerate(ordered)]
    hidden = [ListedEntry(e, by_entry[id(e)]) for e, _ in found if not e.listed]
    nxt = fmt.select(ordered, settings)
    dflt = fmt.select(ordered, settings, oneshot=False)
    if nxt.index is not None:
        listed[nxt.index].next_boot = True
    if dflt.index is not None:
        listed[dflt.index].default = True
    for name, value in (("LoaderEntryOneShot", settings.oneshot),
                        ("LoaderEntryDefault", settings.default_efivar),
                        ("loader.conf default", settings.default_pattern)):
        if value is not None and value.lower() != "@saved" and fmt.find(ordered, value) is None:
            notes.append(f"{name} {value!r} matches no entry: the loader passes over it")
    return Listing(partitions, listed + hidden, settings,
                   next_boot_reason=nxt.reason if nxt.index is not None else None,
                   default_reason=dflt.reason if dflt.index is not None else None,
                   notes=notes)


def next_boot(listing: Listing) -> ListedEntry:
    """The entry the boot loader would boot next; NoBootEntry if there is none."""
    entry = listing.next_boot
    if entry is None:
        where = listing.partitions.esp.path if listing.partitions.esp else "no ESP found"
        raise NoBootEntry(f"no boot loader entry would boot next ({where})")
    return entry


def find(listing: Listing, name: str) -> ListedEntry:
    """The entry named `name`: its id (case-insensitive, as the loader matches) or its
    name without counter and suffix (kernel-install's TOKEN-KVER)."""
    folded = fmt.ascii_lower(name)
    for listed in listing.entries:
        if folded in (listed.entry.id, fmt.ascii_lower(listed.entry.stem)):
            return listed
    raise NoBootEntry(f"no boot loader entry {name!r} (ids: "
                      f"{', '.join(e.id for e in listing.entries) or 'none'})")


def staged_entry_matches(record: dict[str, Any], *, entry: str | None = None,
                         kernel: str | None = None) -> bool:
    """Whether a staged image's entry record (`ListedEntry.staged_record`) is the entry
    `entry` (its id or kernel-install name, any case) or runs kernel release `kernel`
    (a UKI's .uname; for a Type #1 entry the version, which kernel-install sets to the
    release). For `relaunchctl cancel --if-entry … --if-kernel …`."""
    if entry is not None:
        folded = fmt.ascii_lower(entry)
        if folded in (fmt.ascii_lower(record.get("id") or ""),
                      fmt.ascii_lower(record.get("stem") or "")):
            return True
    if kernel is not None:
        if kernel == record.get("uname"):
            return True
        if record.get("type") == fmt.TYPE1 and kernel == record.get("version"):
            return True
    return False


@dataclass
class EntryFiles:
    """An entry's kernel and initrds opened for staging, by descriptor, in the order
    the loader would hand them over (the caller copies them into sealed memfds and
    verifies the copy; `close` releases the descriptors)."""

    entry: ListedEntry
    kernel: int
    initrds: list[tuple[str, int]] = field(default_factory=list)   # (platform path, fd)

    def close(self) -> None:
        for fd in [self.kernel, *(fd for _, fd in self.initrds)]:
            if fd >= 0:
                os.close(fd)
        self.kernel, self.initrds = -1, []

    def __enter__(self) -> EntryFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_files(root: SysRoot, listed: ListedEntry) -> EntryFiles:
    """Open what staging needs of `listed` below its partition, never following a
    symbolic link or a mount; InvalidBootEntry if it cannot be staged (the signature is
    checked on the sealed copy, not here)."""
    require_stageable(listed, require_verified=False)
    entry = listed.entry
    if entry.kernel is None or entry.loader not in ("linux", "uki"):
        raise InvalidBootEntry(f"boot entry {entry.id}: no Linux kernel to stage")
    try:
        with PartitionDir(root, listed.partition) as part:
            files = EntryFiles(listed, part.open_file(entry.kernel))
            try:
                for rel in entry.initrd:
                    files.initrds.append((part.platform_path(rel), part.open_file(rel)))
            except BaseException:
                files.close()
                raise
            return files
    except PartitionError as exc:
        raise InvalidBootEntry(f"boot entry {entry.id}: {exc.detail}") from None


def require_stageable(listed: ListedEntry, *, require_verified: bool = True) -> None:
    """InvalidBootEntry naming every reason this entry cannot be staged."""
    entry = listed.entry
    blocking = [p for p in entry.problems
                if p.hides or p.reason in fmt.UNSTAGEABLE
                or (require_verified and p.reason == fmt.NOT_VERIFIED)]
    if blocking:
        reasons = "; ".join(f"{p.reason}: {p.detail}" for p in blocking)
        raise InvalidBootEntry(f"boot entry {entry.id} cannot be staged: {reasons}")
