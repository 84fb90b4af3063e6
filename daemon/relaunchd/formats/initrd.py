"""The initrd systemd-stub would hand the kernel, as a list of parts (formats layer).

Order (uki.md §5.1, systemd stub.c): ucode add-ons in reverse, `.ucode`,
`.initrd`, the generated `.extra/` cpios (`.pcrsig`, `.pcrpkey`, `.profile`,
`.osrel`, in the stub's table order), initrd add-ons; every part padded with
zeros to 4 bytes. Section parts are the section as loaded (payload then zeros
up to VirtualSize) and stay references into the image file, so a 100 MB
`.initrd` is copied kernel-side (sendfile), never through Python.

Not reproduced: credentials, sysexts and confexts found on the ESP (the stub
reads them from the boot partition at boot; a relaunch has no such partition
in hand) — reported by the caller as a limitation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from relaunchd.formats import cpio
from relaunchd.formats.pe import FileRange, PeSection
from relaunchd.formats.uki import ResolvedImage, UkiImage

# (section, file name under /.extra) in the order stub.c generates them.
GENERATED = (
    (".pcrsig", "tpm2-pcr-signature.json"),
    (".pcrpkey", "tpm2-pcr-public-key.pem"),
    (".profile", "profile"),
    (".osrel", "os-release"),
)
GENERATED_MAX = 4 << 20


@dataclass(frozen=True)
class InitrdPart:
    label: str
    source: FileRange | None = None   # section payload in an image file
    zero_fill: int = 0                # zeros after `source`, up to VirtualSize
    data: bytes = b""                 # generated content

    @property
    def content_size(self) -> int:
        return (self.source.length if self.source else 0) + self.zero_fill + len(self.data)

    @property
    def size(self) -> int:
        """Padded to 4 bytes, as the stub concatenates."""
        return self.content_size + (-self.content_size % 4)


def section_part(image: UkiImage, section: PeSection, label: str) -> InitrdPart:
    return InitrdPart(label=label, source=image.payload(section),
                      zero_fill=section.virtual_size - section.payload_size)


def plan(image: UkiImage, resolved: ResolvedImage, *,
         ucode_addons: list[InitrdPart] | None = None,
         initrd_addons: list[InitrdPart] | None = None) -> list[InitrdPart]:
    """The stub's initrd for this image and profile; empty list = no initrd."""
    parts: list[InitrdPart] = list(reversed(ucode_addons or []))
    for name in (".ucode", ".initrd"):
        section = resolved.sections.get(name)
        if section is not None and section.virtual_size:
            parts.append(section_part(image, section, name))
    for name, filename in GENERATED:
        section = resolved.sections.get(name)
        if section is None or not section.virtual_size:
            continue
        loaded = image.read_section(section, GENERATED_MAX)
        loaded += bytes(section.virtual_size - len(loaded))
        parts.append(InitrdPart(label=f".extra/{filename}",
                                data=cpio.literal_archive(".extra", filename, loaded)))
    parts.extend(initrd_addons or [])
    return parts


def total_size(parts: list[InitrdPart]) -> int:
    return sum(p.size for p in parts)


def write(parts: list[InitrdPart], out_fd: int, *, first_in_place: bool = False) -> int:
    """Append the parts to `out_fd`; file data moves with sendfile.
    `first_in_place`: `out_fd` already holds the first part's file data (and is
    positioned after it), so only what follows it is written."""
    written = 0
    for index, part in enumerate(parts):
        if first_in_place and index == 0:
            if part.source is None or os.lseek(out_fd, 0, os.SEEK_CUR) != part.source.length:
                raise ValueError("the initrd memfd does not hold the first part's data")
        elif part.source is not None:
            offset, left = part.source.offset, part.source.length
            while left:
                sent = os.sendfile(out_fd, part.source.fd, offset, min(left, 1 << 30))
                if sent <= 0:
                    raise OSError(f"sendfile of {part.label} stopped after {written} bytes")
                offset += sent
                left -= sent
        tail = bytes(part.zero_fill) + part.data + bytes(part.size - part.content_size)
        view = memoryview(tail)
        while view:
            n = os.write(out_fd, view)
            view = view[n:]
        written += part.size
    return written
