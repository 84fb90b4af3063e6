"""PE/COFF headers as plain data (formats layer).

Reads the headers of a PE image that lives in a byte range of an open file
(a whole UKI, or the `.linux` kernel inside one, without copying it) and
returns the section table and the facts Authenticode needs. The fixed-layout
fields are read here with struct, together with the checks that make a
hostile file a named error instead of a surprise: every section inside the
file, no overlaps, sane sizes, short names only (the stub compares 8-byte
names and has no string table, uki.md §1.1). pefile then parses the same
header bytes independently and must agree (`confirm_with_pefile`).

The two steps are separate so that a caller about to hash a 100 MB image can
start hashing (safe: every range is already checked to lie inside the file)
and let pefile's import (~25 ms, as long as hashing a quarter of an initrd)
and parse run meanwhile — `image_report.inspect_image` does that, and always
confirms before it reports anything.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass

from relaunchd.errors import InvalidImage

# Machine types (uki.md §1.1).
MACHINES = {
    0x8664: "x86_64",
    0xAA64: "aarch64",
    0x5064: "riscv64",
    0x6264: "loongarch64",
    0x014C: "i386",
    0x01C4: "arm",
}
IMAGE_DIRECTORY_ENTRY_SECURITY = 4
# Caps that keep a hostile header from making us read or hash gigabytes.
MAX_IMAGE_SIZE = 4 << 30          # kexec_file_load takes at most 4 GiB per file
MAX_HEADER_BYTES = 1 << 20        # section table of 256 profiles fits easily
MAX_SECTIONS = 4096
MAX_OPTIONAL_HEADER = 1024        # 240 for PE32+ with 16 data directories
MIN_ZERO_FILL_LIMIT = 64 << 20    # VirtualSize beyond the raw data, at least this is allowed


@dataclass(frozen=True)
class FileRange:
    """A byte range [offset, offset+length) of an open file descriptor."""

    fd: int
    offset: int
    length: int

    def pread(self, start: int, size: int) -> bytes:
        if start < 0 or size < 0 or start + size > self.length:
            raise InvalidImage(
                f"read of {size} bytes at 0x{start:x} is outside the {self.length}-byte image"
            )
        data = os.pread(self.fd, size, self.offset + start)
        if len(data) != size:
            raise InvalidImage(f"file shrank while reading: wanted {size} bytes at 0x{start:x}")
        return data

    def sub(self, start: int, size: int) -> FileRange:
        if start < 0 or size < 0 or start + size > self.length:
            raise InvalidImage(f"range 0x{start:x}+0x{size:x} is outside the image")
        return FileRange(self.fd, self.offset + start, size)


@dataclass(frozen=True)
class DetachedRange:
    """Bytes [offset, offset+length) of an image file that are held at offset 0 of
    another descriptor instead (the image's own copy has a hole there)."""

    offset: int
    length: int
    fd: int


@dataclass(frozen=True)
class PeSection:
    name: str
    index: int               # position in the section table
    virtual_address: int
    virtual_size: int        # Misc_VirtualSize: the size the loader maps
    raw_offset: int          # PointerToRawData
    raw_size: int            # SizeOfRawData (FileAlignment-padded)
    characteristics: int

    @property
    def payload_size(self) -> int:
        """Bytes that really belong to the section (uki.md §1.1, §3.3)."""
        return min(self.virtual_size, self.raw_size)


@dataclass(frozen=True)
class PeHeaders:
    machine: int
    pe32_plus: bool
    subsystem: int
    size_of_headers: int
    size_of_image: int
    checksum_offset: int        # the 4-byte CheckSum Authenticode skips
    cert_dir_offset: int        # the 8-byte security data-directory entry it skips
    cert_table_offset: int      # file offset of the WIN_CERTIFICATE table (0 if none)
    cert_table_size: int
    sections: tuple[PeSection, ...]
    file_size: int
    header_end: int = 0         # end of the section table: what pefile gets to parse
    optional_magic: int = 0
    number_of_rva_and_sizes: int = 0

    @property
    def machine_name(self) -> str:
        return MACHINES.get(self.machine, f"0x{self.machine:04x}")

    @property
    def signed(self) -> bool:
        return self.cert_table_size > 0


def parse_headers(image: FileRange, *, confirm: bool = True) -> PeHeaders:
    """Parse and validate PE headers; raise InvalidImage naming what is wrong.
    `confirm=False` skips the pefile cross-check: the caller must run
    `confirm_with_pefile` itself before it trusts the result."""
    headers = _read_headers(image)
    if confirm:
        confirm_with_pefile(image, headers)
    return headers


def _read_headers(image: FileRange) -> PeHeaders:
    size = image.length
    if size == 0:
        raise InvalidImage("empty file")
    if size < 0x40:
        raise InvalidImage(f"too small to be a PE image ({size} bytes)")
    if size > MAX_IMAGE_SIZE:
        raise InvalidImage(f"larger than {MAX_IMAGE_SIZE >> 30} GiB ({size} bytes)")
    dos = image.pread(0, 0x40)
    if dos[:2] != b"MZ":
        raise InvalidImage("not a PE image (no MZ signature)")
    e_lfanew = struct.unpack_from("<I", dos, 0x3C)[0]
    if e_lfanew + 24 > size:
        raise InvalidImage(f"PE header offset 0x{e_lfanew:x} is beyond the end of the file")
    coff = image.pread(e_lfanew, 24)
    if coff[:4] != b"PE\0\0":
        raise InvalidImage("not a PE image (no PE signature)")
    nsections, = struct.unpack_from("<H", coff, 6)
    opt_size, = struct.unpack_from("<H", coff, 20)
    if not 96 <= opt_size <= MAX_OPTIONAL_HEADER:
        raise InvalidImage(f"optional header size {opt_size} is implausible for a PE image "
                           "(malformed section table location)")
    if nsections == 0:
        raise InvalidImage("PE image has no sections")
    if nsections > MAX_SECTIONS:
        raise InvalidImage(f"PE image claims {nsections} sections (limit {MAX_SECTIONS})")
    table_end = e_lfanew + 24 + opt_size + 40 * nsections
    if table_end > size:
        raise InvalidImage("section table extends beyond the end of the file (truncated?)")
    if table_end > MAX_HEADER_BYTES:
        raise InvalidImage(f"PE headers of {table_end} bytes are implausibly large")
    header_bytes = image.pread(0, table_end)
    # The section table is read here, not from pefile: given only the
    # headers, pefile silently stops listing sections after a few
    # "beyond the end of the file" warnings.
    table = e_lfanew + 24 + opt_size
    sections = tuple(
        _section(header_bytes[table + 40 * i: table + 40 * (i + 1)], i)
        for i in range(nsections)
    )
    return _validate(header_bytes, image, e_lfanew, opt_size, sections)


def confirm_with_pefile(image: FileRange, headers: PeHeaders) -> None:
    """pefile parses the same header bytes on its own; it must accept them and read
    the fields we rely on as we did. Two parsers agreeing is the point: a header
    crafted to be read one way by us and another way by a loader is refused."""
    import pefile  # lazy: keeps `relaunchctl --help` fast

    header_bytes = image.pread(0, headers.header_end)
    try:
        parsed = pefile.PE(data=header_bytes, fast_load=True)
    except pefile.PEFormatError as exc:
        raise InvalidImage(f"malformed PE headers: {exc.value}") from None
    except (struct.error, ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        # pefile has no single error type for every malformed header.
        raise InvalidImage(f"malformed PE headers: {exc}") from None
    try:
        opt = getattr(parsed, "OPTIONAL_HEADER", None)
        if opt is None:
            raise InvalidImage("PE image has no optional header (pefile)")
        theirs = {"Machine": parsed.FILE_HEADER.Machine,
                  "NumberOfSections": parsed.FILE_HEADER.NumberOfSections,
                  "Magic": opt.Magic, "Subsystem": opt.Subsystem,
                  "SizeOfHeaders": opt.SizeOfHeaders, "SizeOfImage": opt.SizeOfImage,
                  "NumberOfRvaAndSizes": opt.NumberOfRvaAndSizes}
    finally:
        parsed.close()
    ours = {"Machine": headers.machine, "NumberOfSections": len(headers.sections),
            "Magic": headers.optional_magic, "Subsystem": headers.subsystem,
            "SizeOfHeaders": headers.size_of_headers, "SizeOfImage": headers.size_of_image,
            "NumberOfRvaAndSizes": headers.number_of_rva_and_sizes}
    differ = [f"{k} {ours[k]:#x} vs {theirs[k]:#x}" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise InvalidImage("PE headers read differently by pefile: " + ", ".join(differ))


def _validate(header_bytes: bytes, image: FileRange, e_lfanew: int, opt_size: int,
              sections: tuple[PeSection, ...]) -> PeHeaders:
    size = image.length
    opt_start = e_lfanew + 24
    magic, = struct.unpack_from("<H", header_bytes, opt_start)
    if magic not in (0x10B, 0x20B):
        raise InvalidImage(f"unknown optional header magic 0x{magic:x}")
    pe32_plus = magic == 0x20B
    dirs_start = opt_start + (112 if pe32_plus else 96)
    if dirs_start > opt_start + opt_size:
        raise InvalidImage(f"optional header of {opt_size} bytes is too small for "
                           f"{'PE32+' if pe32_plus else 'PE32'}")
    # Offsets in the optional header (PE/COFF spec §3.4): the same for PE32 and PE32+
    # up to the data directories, whose count is the last field before them.
    machine, = struct.unpack_from("<H", header_bytes, e_lfanew + 4)
    size_of_image, size_of_headers = struct.unpack_from("<II", header_bytes, opt_start + 56)
    subsystem, = struct.unpack_from("<H", header_bytes, opt_start + 68)
    n_dirs, = struct.unpack_from("<I", header_bytes, dirs_start - 4)
    cert_dir_offset = dirs_start + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY
    cert_offset = cert_size = 0
    if n_dirs > IMAGE_DIRECTORY_ENTRY_SECURITY and cert_dir_offset + 8 <= opt_start + opt_size:
        cert_offset, cert_size = struct.unpack_from(
            "<II", image.pread(cert_dir_offset, 8)
        )
        if cert_size and (cert_offset + cert_size > size or cert_offset < opt_start):
            raise InvalidImage(
                f"certificate table at 0x{cert_offset:x}+0x{cert_size:x} is outside the file"
            )
        if not cert_size:
            cert_offset = 0
    if size_of_headers > size:
        raise InvalidImage(f"SizeOfHeaders 0x{size_of_headers:x} is beyond the end of the file")

    zero_fill_limit = max(MIN_ZERO_FILL_LIMIT, size)
    for s in sections:
        if s.raw_size and s.raw_offset + s.raw_size > size:
            raise InvalidImage(
                f"section {s.name} (0x{s.raw_offset:x}+0x{s.raw_size:x}) extends beyond the "
                f"end of the {size}-byte file (truncated?)"
            )
        if s.virtual_size > s.raw_size + zero_fill_limit:
            raise InvalidImage(
                f"section {s.name} has VirtualSize 0x{s.virtual_size:x}, far beyond its "
                f"0x{s.raw_size:x} bytes of data"
            )
        if s.raw_size and cert_size and s.raw_offset < cert_offset + cert_size and (
            cert_offset < s.raw_offset + s.raw_size
        ):
            raise InvalidImage(f"section {s.name} overlaps the certificate table")
    _check_overlaps(
        sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset),
        lambda s: (s.raw_offset, s.raw_size), "in the file",
    )
    _check_overlaps(
        sorted((s for s in sections if s.virtual_size), key=lambda s: s.virtual_address),
        lambda s: (s.virtual_address, s.virtual_size), "in memory",
    )
    return PeHeaders(
        machine=machine,
        pe32_plus=pe32_plus,
        subsystem=subsystem,
        size_of_headers=size_of_headers,
        size_of_image=size_of_image,
        checksum_offset=opt_start + 64,
        cert_dir_offset=cert_dir_offset,
        cert_table_offset=cert_offset,
        cert_table_size=cert_size,
        sections=sections,
        file_size=size,
        header_end=len(header_bytes),
        optional_magic=magic,
        number_of_rva_and_sizes=n_dirs,
    )


def _section(raw: bytes, index: int) -> PeSection:
    """One 40-byte IMAGE_SECTION_HEADER (PE/COFF spec §3.1)."""
    name_bytes = raw[:8]
    vsize, va, raw_size, raw_offset = struct.unpack_from("<IIII", raw, 8)
    characteristics, = struct.unpack_from("<I", raw, 36)
    if name_bytes.startswith(b"/"):
        raise InvalidImage(
            f"section {index} has a long name ({name_bytes.rstrip(bytes(1))!r}); names over "
            "8 bytes are not supported"
        )
    name_part, _, rest = name_bytes.partition(b"\0")
    if rest.strip(b"\0"):
        raise InvalidImage(f"section {index} has a malformed name {name_bytes!r}")
    try:
        name = name_part.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidImage(f"section {index} has a non-ASCII name {name_bytes!r}") from None
    if not name.isprintable():
        raise InvalidImage(f"section {index} has a non-printable name {name_bytes!r}")
    return PeSection(
        name=name,
        index=index,
        virtual_address=va,
        virtual_size=vsize,
        raw_offset=raw_offset,
        raw_size=raw_size,
        characteristics=characteristics,
    )


def _check_overlaps(ordered: list[PeSection], extent, where: str) -> None:
    for a, b in itertools.pairwise(ordered):
        start, length = extent(a)
        if start + length > extent(b)[0]:
            raise InvalidImage(f"section {a.name} overlaps section {b.name} {where}")


def authenticode_ranges(headers: PeHeaders) -> list[tuple[int, int]]:
    """The (offset, length) ranges the Authenticode digest covers, ascending.

    uki.md §3.1 / Authenticode PE spec: the headers up to SizeOfHeaders without
    the CheckSum and the certificate-table directory entry; each section with
    SizeOfRawData > 0 in PointerToRawData order; then the bytes from
    SUM_OF_BYTES_HASHED (SizeOfHeaders + every SizeOfRawData) to the end of
    the file minus the certificate table. The spec, the kernel's
    verify_pefile.c and sbsigntool all start the tail at that sum rather than
    at the end of the last section; with contiguous sections (every image we
    have seen) both are the same. Layouts where they differ would hash bytes
    twice or out of order, which one streaming pass cannot do: refused.

    The spec assumes the table is last in the file. If it is not, we leave out
    exactly the table's bytes and hash the rest (the signature can cover
    everything but itself); sbverify would instead hash up to
    file_len - table_size, so such a file can get different verdicts.
    """
    size = headers.size_of_headers
    checksum, cert_dir = headers.checksum_offset, headers.cert_dir_offset
    if not (checksum + 4 <= cert_dir and cert_dir + 8 <= size):
        raise InvalidImage(
            "PE CheckSum and certificate directory are not inside SizeOfHeaders; "
            "cannot compute the Authenticode digest")
    ranges = [(0, checksum), (checksum + 4, cert_dir - checksum - 4),
              (cert_dir + 8, size - cert_dir - 8)]
    sections = sorted((s for s in headers.sections if s.raw_size), key=lambda s: s.raw_offset)
    ranges += [(s.raw_offset, s.raw_size) for s in sections]
    hashed = size + sum(s.raw_size for s in sections)   # SUM_OF_BYTES_HASHED
    if sections and hashed < sections[-1].raw_offset + sections[-1].raw_size:
        raise InvalidImage(
            "PE sections leave gaps in the file; the Authenticode tail would overlap "
            "section data (unsupported layout)")
    table_start = headers.cert_table_offset
    table_end = table_start + headers.cert_table_size
    if headers.cert_table_size and table_start < hashed:
        raise InvalidImage(
            f"certificate table at 0x{table_start:x} lies inside the signed part of the image")
    if not headers.cert_table_size:
        ranges.append((hashed, headers.file_size - hashed))
    else:
        ranges.append((hashed, table_start - hashed))
        ranges.append((table_end, headers.file_size - table_end))
    ranges = [(off, n) for off, n in ranges if n > 0]
    end = 0
    for off, n in ranges:
        if off < end:
            raise InvalidImage(
                f"PE layout overlaps at 0x{off:x} (SizeOfHeaders 0x{size:x} reaches into "
                "the sections?); cannot compute the Authenticode digest")
        end = off + n
    if end > headers.file_size:
        raise InvalidImage("Authenticode ranges extend beyond the end of the file")
    return ranges
