"""Unified Kernel Images: parse headers, slice profiles, resolve sections (formats layer;
`platform.image_files` opens the files).

Facts from docs/research/uki.md §1: the stub looks sections up by 8-byte name,
the first match wins; payload = min(VirtualSize, SizeOfRawData) bytes from the
file and the measured image is that payload zero-padded to VirtualSize;
multi-profile UKIs split the section table at each `.profile` (§1.4).

An image is read through its file descriptor with pread, never loaded whole,
so a 100 MB UKI costs a few kilobytes of Python memory until something hashes
it (see `hashing`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from relaunchd.errors import InvalidArgument, InvalidImage
from relaunchd.formats import pe
from relaunchd.formats.osrel import parse_env_block

NATIVE_MACHINE = {"x86_64": 0x8664, "aarch64": 0xAA64, "riscv64": 0x5064,
                  "loongarch64": 0x6264}
PROFILES_MAX = 256              # UNIFIED_PROFILES_MAX in systemd
TEXT_SECTION_LIMIT = 4 << 20    # bootspec does not load text sections over 4 MiB either
# Sections that may legitimately appear several times in one slice (§1.4).
MULTI_SECTIONS = frozenset({".dtbauto", ".efifw"})
_SDMAGIC = re.compile(rb"#### LoaderInfo: systemd-stub ([^ #\0]+) ####")


@dataclass(frozen=True)
class StubVersion:
    text: str      # e.g. "252.39-1~deb12u2"
    major: int     # e.g. 252


@dataclass(frozen=True)
class Profile:
    number: int
    sections: tuple[pe.PeSection, ...]   # starts with its `.profile` section


@dataclass(frozen=True)
class ResolvedImage:
    """The sections the stub would use for one profile, by name."""

    profile: int | None                  # None: the UKI has no `.profile` sections
    sections: dict[str, pe.PeSection]    # name -> section, masks applied
    multi: dict[str, tuple[pe.PeSection, ...]]  # .dtbauto/.efifw candidates


class UkiImage:
    """An open UKI: its descriptor, PE headers and the views built from them."""

    def __init__(self, fd: int, path: str, headers: pe.PeHeaders, owns_fd: bool,
                 confirmed: bool = True, detached: pe.DetachedRange | None = None):
        self.fd = fd
        self.path = path
        self.headers = headers
        self._owns_fd = owns_fd
        self._confirmed = confirmed
        self.range = pe.FileRange(fd, 0, headers.file_size)
        self.base, self.profiles = _slice_profiles(headers.sections)
        self.detached = detached
        if detached is not None and not any(
                s.raw_offset == detached.offset and s.payload_size == detached.length
                for s in headers.sections):
            # The hole must be exactly one section's payload: sections, headers and
            # certificate table never overlap (pe), so nothing else reads it.
            raise InvalidImage("the detached range is not a section payload of these "
                               "headers (the file changed while it was copied)")

    @property
    def overlays(self) -> tuple[tuple[int, int, int], ...]:
        """For `hashing.feed`: where the image's bytes come from another descriptor."""
        d = self.detached
        return ((d.offset, d.length, d.fd),) if d is not None else ()

    # -- lifecycle
    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> UkiImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.headers.file_size

    def confirm_headers(self) -> None:
        """The pefile cross-check of the headers, if `open_image`/`from_fd` was told to
        leave it for later (pe.confirm_with_pefile); idempotent."""
        if self._confirmed:
            return
        try:
            pe.confirm_with_pefile(self.range, self.headers)
        except InvalidImage as exc:
            raise InvalidImage(f"{self.path}: {exc}") from None
        self._confirmed = True

    # -- section lookup
    def resolve(self, profile: int | None = None) -> ResolvedImage:
        """Base sections overlaid with the selected profile's (uki.md §1.4).

        No profile given → profile 0. A UKI without `.profile` sections has
        only profile 0, which is the base alone."""
        number = 0 if profile is None else profile
        if number < 0:
            raise InvalidArgument(f"profile {number} is not a valid profile number")
        if not self.profiles:
            if number != 0:
                raise InvalidArgument(f"{self.path}: has no profiles; profile {number} "
                                      "does not exist")
            slices: list[tuple[pe.PeSection, ...]] = [self.base]
            selected = None
        else:
            if number >= len(self.profiles):
                raise InvalidArgument(
                    f"{self.path}: profile {number} does not exist "
                    f"(the image has {len(self.profiles)})")
            slices = [self.base, self.profiles[number].sections]
            selected = number
        resolved: dict[str, pe.PeSection] = {}
        multi: dict[str, tuple[pe.PeSection, ...]] = {}
        for part in slices:
            first: dict[str, pe.PeSection] = {}
            many: dict[str, list[pe.PeSection]] = {}
            for section in part:
                if section.name in MULTI_SECTIONS:
                    many.setdefault(section.name, []).append(section)
                else:
                    first.setdefault(section.name, section)   # first match wins
            for name, section in first.items():
                if section.virtual_size == 0:
                    resolved.pop(name, None)                  # a 0-size section masks
                else:
                    resolved[name] = section
            for name, sections in many.items():
                multi[name] = tuple(s for s in sections if s.virtual_size)
        if ".linux" not in resolved:
            raise InvalidImage(f"{self.path}: image lacks a .linux section"
                               + (f" in profile {selected}" if selected else ""))
        return ResolvedImage(profile=selected, sections=resolved, multi=multi)

    def payload(self, section: pe.PeSection) -> pe.FileRange:
        d = self.detached
        if d is not None and (section.raw_offset, section.payload_size) == (d.offset, d.length):
            return pe.FileRange(d.fd, 0, d.length)
        return self.range.sub(section.raw_offset, section.payload_size)

    def read_section(self, section: pe.PeSection, limit: int = TEXT_SECTION_LIMIT) -> bytes:
        """Payload bytes of a small (text) section; larger ones are an error."""
        if section.payload_size > limit:
            raise InvalidImage(f"{self.path}: section {section.name} is "
                               f"{section.payload_size} bytes, over the {limit}-byte limit")
        return self.payload(section).pread(0, section.payload_size)

    # -- parsed views
    def stub_version(self) -> StubVersion | None:
        """The systemd-stub version from `.sdmagic` (uki.md §1.2)."""
        section = next((s for s in self.headers.sections if s.name == ".sdmagic"), None)
        if section is None:
            return None
        match = _SDMAGIC.search(self.read_section(section, 4096))
        if not match:
            return None
        text = match.group(1).decode("ascii", "replace")
        major = re.match(r"\d+", text)
        return StubVersion(text=text, major=int(major.group()) if major else 0)

    def text(self, resolved: ResolvedImage, name: str) -> str | None:
        section = resolved.sections.get(name)
        if section is None:
            return None
        return self.read_section(section).split(b"\0", 1)[0].decode("utf-8", "replace")

    def os_release(self, resolved: ResolvedImage) -> dict[str, str]:
        text = self.text(resolved, ".osrel")
        return parse_env_block(text) if text is not None else {}

    def profile_info(self, resolved: ResolvedImage) -> dict[str, str]:
        text = self.text(resolved, ".profile")
        return parse_env_block(text) if text is not None else {}

    def uname(self, resolved: ResolvedImage) -> str | None:
        text = self.text(resolved, ".uname")
        return text.strip() if text is not None else None

    def cmdline(self, resolved: ResolvedImage) -> str | None:
        """`.cmdline` as the stub hands it to the kernel (uki.md §5.2 rules 3–4)."""
        text = self.text(resolved, ".cmdline")
        return mangle_cmdline(text) if text is not None else None

    def sbat(self, resolved: ResolvedImage) -> list[list[str]]:
        text = self.text(resolved, ".sbat")
        if text is None:
            return []
        return [line.split(",") for line in text.splitlines() if line.strip()]

    def all_profiles(self) -> list[dict[str, str]]:
        """Each profile's number and `.profile` fields (ID, TITLE, ...)."""
        result = []
        for profile in self.profiles:
            data = self.read_section(profile.sections[0]).split(b"\0", 1)[0]
            fields = parse_env_block(data.decode("utf-8", "replace"))
            result.append({"number": profile.number, **fields})
        return result


def mangle_cmdline(text: str) -> str:
    """systemd's mangle_stub_cmdline: drop leading whitespace, turn every
    character ≤ 0x20 or 0x7F into a space (no collapsing), chop trailing
    whitespace."""
    mangled = "".join(" " if ord(c) <= 0x20 or ord(c) == 0x7F else c for c in text)
    return mangled.strip(" ")


def _slice_profiles(
    sections: tuple[pe.PeSection, ...],
) -> tuple[tuple[pe.PeSection, ...], list[Profile]]:
    starts = [i for i, s in enumerate(sections) if s.name == ".profile"]
    if len(starts) > PROFILES_MAX:
        raise InvalidImage(f"image has {len(starts)} profiles (limit {PROFILES_MAX})")
    if not starts:
        return sections, []
    base = sections[: starts[0]]
    bounds = [*starts, len(sections)]
    profiles = [Profile(number=n, sections=sections[bounds[n]: bounds[n + 1]])
                for n in range(len(starts))]
    return base, profiles


def from_fd(fd: int, path: str, *, machine: int | None = None,
            owns_fd: bool = False, confirm: bool = True,
            detached: pe.DetachedRange | None = None) -> UkiImage:
    """Parse a UKI from an already-open descriptor (e.g. a sealed memfd); with
    `detached`, one section's payload is read from another descriptor."""
    size = os.fstat(fd).st_size
    try:
        headers = pe.parse_headers(pe.FileRange(fd, 0, size), confirm=confirm)
    except InvalidImage as exc:
        raise InvalidImage(f"{path}: {exc}") from None
    require_machine(headers, path, machine)
    if not any(s.name == ".linux" for s in headers.sections):
        raise InvalidImage(f"{path}: not a UKI (image lacks a .linux section)")
    try:
        return UkiImage(fd, path, headers, owns_fd, confirmed=confirm, detached=detached)
    except InvalidImage as exc:
        raise InvalidImage(f"{path}: {exc}") from None


def require_machine(headers: pe.PeHeaders, path: str, machine: int | None = None) -> None:
    """The image must be built for `machine` (default: this machine's)."""
    want = machine if machine is not None else NATIVE_MACHINE.get(os.uname().machine)
    if want is not None and headers.machine != want:
        raise InvalidImage(
            f"{path}: built for {headers.machine_name}, not for "
            f"{pe.MACHINES.get(want, hex(want))}"
        )
