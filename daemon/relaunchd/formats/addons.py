"""UKI add-ons: where systemd-stub finds them, which it applies, what they add.

Facts (uki.md §1.5, §5.1–§5.2; systemd stub.c load_all_addons/load_addons):
- The stub looks on the partition the UKI was loaded from, first in
  `\\loader\\addons\\`, then in `<UKI path>.extra.d\\`; each directory's entries
  are sorted by name; dot-files, directories, non-ASCII names, names over 255
  characters and names not ending in `.addon.efi` (any case) are passed over.
- An add-on must load (shim_load_image: verified under Secure Boot), carry at
  least one of `.cmdline .dtb .dtbauto .initrd .ucode`, carry no `.linux`, and, if
  both it and the UKI have `.uname`, match the UKI's; otherwise it is ignored.
- `.cmdline` add-ons exist since systemd 254, `.initrd`/`.ucode` add-ons since 257:
  an older stub would not apply them, so neither do we.
- Effect: the add-on command lines follow the UKI's; `.ucode` add-ons go first in
  the initrd in reverse order, `.initrd` add-ons last in order (initrd.plan);
  device-tree add-ons have no meaning for a kexec here and are reported, not used.

Where the stub ignores an add-on it cannot verify and boots on, relaunchd refuses to
stage: a relaunch that silently lost an add-on would not be the boot the admin set
up. Every add-on is read through a sealed memfd copy, like the UKI (`platform.addon_files`
finds and copies them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from relaunchd.errors import InvalidImage, VerificationFailed
from relaunchd.formats import pe, signature_report, uki
from relaunchd.formats.initrd import InitrdPart

CMDLINE_SINCE = 254                # systemd version that first applies .cmdline add-ons
INITRD_SINCE = 257                 # ... and .initrd / .ucode add-ons
EFFECTIVE = (".cmdline", ".dtb", ".dtbauto", ".initrd", ".ucode")


@dataclass
class Addon:
    """One add-on file, copied into a sealed memfd and parsed (not yet verified)."""

    path: str
    scope: str                      # "global" | "per-UKI"
    fd: int
    headers: pe.PeHeaders
    sections: dict[str, pe.PeSection]   # first match by name, as the stub looks up
    signature: signature_report.SignatureReport | None = None   # set by verify()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @classmethod
    def from_fd(cls, fd: int, path: str, scope: str) -> Addon:
        """Parse an add-on already copied into (sealed) memory; the fd becomes the
        add-on's and is closed with it."""
        size = os.fstat(fd).st_size
        try:
            headers = pe.parse_headers(pe.FileRange(fd, 0, size))
        except InvalidImage as exc:
            raise InvalidImage(f"add-on {path}: {exc}") from None
        uki.require_machine(headers, f"add-on {path}")
        sections: dict[str, pe.PeSection] = {}
        for section in headers.sections:
            sections.setdefault(section.name, section)
        return cls(path=path, scope=scope, fd=fd, headers=headers, sections=sections)

    def has(self, name: str) -> bool:
        """Present and not empty: the stub treats a 0-size section as absent."""
        section = self.sections.get(name)
        return section is not None and section.virtual_size > 0

    def loaded(self, name: str) -> bytes:
        """A small section as loaded: payload, then zeros up to VirtualSize."""
        section = self.sections[name]
        if section.virtual_size > uki.TEXT_SECTION_LIMIT:
            raise InvalidImage(f"add-on {self.path}: {name} is {section.virtual_size} bytes, "
                               f"over the {uki.TEXT_SECTION_LIMIT}-byte limit")
        data = self._range(section).pread(0, section.payload_size)
        return data + bytes(section.virtual_size - len(data))

    def text(self, name: str) -> str | None:
        if not self.has(name):
            return None
        return self.loaded(name).split(b"\0", 1)[0].decode("utf-8", "replace")

    def part(self, name: str) -> InitrdPart | None:
        """The section as loaded (payload, then zeros to VirtualSize), for the initrd."""
        if not self.has(name):
            return None
        section = self.sections[name]
        return InitrdPart(label=f"{os.path.basename(self.path)}:{name}",
                          source=self._range(section),
                          zero_fill=section.virtual_size - section.payload_size)

    def _range(self, section: pe.PeSection) -> pe.FileRange:
        return pe.FileRange(self.fd, section.raw_offset, section.payload_size)


@dataclass
class AddonSelection:
    """What the stub would take from the add-ons for one UKI."""

    applied: list[Addon] = field(default_factory=list)
    cmdlines: list[str] = field(default_factory=list)
    ucode: list[InitrdPart] = field(default_factory=list)     # list order; initrd.plan reverses
    initrd: list[InitrdPart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # path -> the sections used from it
    used: dict[str, list[str]] = field(default_factory=dict)


def select(found: list[Addon], *, stub_major: int | None, uki_uname: str | None) -> AddonSelection:
    """Apply the stub's rules to the discovered add-ons, in order. `stub_major`:
    the UKI's systemd-stub version (None: unknown, taken as the newest)."""
    chosen = AddonSelection()
    if found and stub_major is not None and stub_major < CMDLINE_SINCE:
        chosen.notes.append(f"add-ons ignored: the image's systemd-stub {stub_major} "
                            f"predates add-ons ({CMDLINE_SINCE})")
        return chosen
    for addon in found:
        name = os.path.basename(addon.path)
        if addon.has(".linux"):
            chosen.notes.append(f"add-on {addon.path} ignored: it is a UKI (has .linux), "
                                "as systemd-stub would")
            continue
        if not any(addon.has(s) for s in EFFECTIVE):
            chosen.notes.append(f"add-on {addon.path} ignored: none of "
                                f"{' '.join(EFFECTIVE)}, as systemd-stub would")
            continue
        if (uki_uname is not None and addon.has(".uname")
                and not uname_matches(uki_uname, addon.loaded(".uname"))):
            chosen.notes.append(f"add-on {addon.path} ignored: .uname {addon.text('.uname')!r} "
                                f"is not the image's {uki_uname!r}, as systemd-stub would")
            continue
        used = []
        cmdline = addon.text(".cmdline")
        if cmdline is not None:
            chosen.cmdlines.append(cmdline)
            used.append(".cmdline")
        for kind, target in ((".ucode", chosen.ucode), (".initrd", chosen.initrd)):
            if not addon.has(kind):
                continue
            if stub_major is not None and stub_major < INITRD_SINCE:
                chosen.notes.append(f"add-on {name}: its {kind} is not used: the image's "
                                    f"systemd-stub {stub_major} predates {kind} add-ons "
                                    f"({INITRD_SINCE})")
                continue
            part = addon.part(kind)
            if part is not None:
                target.append(part)
                used.append(kind)
        for kind in (".dtb", ".dtbauto"):
            if addon.has(kind):
                chosen.notes.append(f"add-on {name}: its {kind} is not used (a kexec keeps "
                                    "the running kernel's firmware tables)")
        if used:
            chosen.applied.append(addon)
            chosen.used[addon.path] = used
    return chosen


def uname_matches(uki_uname: str, loaded: bytes) -> bool:
    """The stub's check, strneq8(uname, add-on .uname, its size): equal up to the first
    NUL or the end of the add-on's section, whichever comes first, so an add-on for
    "6.1.0-x" also takes a UKI whose .uname is "6.1.0-x-extra"."""
    ours = uki_uname.encode()
    for i, theirs in enumerate(loaded):
        mine = ours[i] if i < len(ours) else 0
        if mine != theirs:
            return False
        if mine == 0:
            return True
    return True


def verify(chosen: AddonSelection, trusted: list, allow_unsigned: bool) -> None:
    """Every applied add-on must verify against the trusted certificates, like the
    UKI; with `allow_unsigned` and no trust configured they are taken as they are."""
    from relaunchd.formats import authenticode

    for addon in chosen.applied:
        report = authenticode.verify_file(addon.fd, addon.headers, trusted)
        addon.signature = report
        if report.verified:
            continue
        if allow_unsigned and not trusted:
            chosen.notes.append(f"add-on {addon.path} is not verified "
                                "(--insecure-allow-unsigned)")
            continue
        why = "; ".join(report.reasons) or "no signature verifies"
        raise VerificationFailed(f"add-on {addon.path}: {why} (refused: systemd-stub would "
                                 "boot without it, a relaunch must not)")


def describe(chosen: AddonSelection) -> list[dict]:
    """For plan.json: each applied add-on, what it gave and who signed it."""
    return [{"path": a.path, "scope": a.scope, "sections": chosen.used.get(a.path, []),
             "verified_by": a.signature.verified_by if a.signature else None}
            for a in chosen.applied]
