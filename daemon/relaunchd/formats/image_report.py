"""Everything `inspect` reports about a UKI, computed in one read of the file.

Combines the formats modules: section resolution (`uki`), PCR 11 prediction
and `.pcrsig` checks (`pcr11`) and Authenticode (`authenticode`). All hashes
— per-section digests in every bank and the Authenticode image digest — are
fed from a single pass over the file by `hashing.feed`, so inspecting a
100 MB image reads it once and hashes banks on all cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from relaunchd.errors import InvalidImage
from relaunchd.formats import hashing, pcr11, pe, signature_report
from relaunchd.formats.pe import PeSection
from relaunchd.formats.uki import StubVersion, UkiImage


class _Abandoned(Exception):
    """Stops the hash pass when the image was refused while it ran."""


# Authenticode algorithms we can compute; others are reported, not verified.
_DIGEST_ALGORITHMS = {"sha1", "sha256", "sha384", "sha512"}


@dataclass(frozen=True)
class SectionInfo:
    name: str
    index: int
    offset: int
    size: int            # VirtualSize
    sha256: str          # of the measured image (payload zero-padded to VirtualSize)
    used: bool           # part of the resolved profile


@dataclass
class ImageReport:
    path: str
    size: int
    machine: str
    profile: int | None
    sections: list[SectionInfo]
    os_release: dict[str, str]
    uname: str | None
    cmdline: str | None
    sbat: list[list[str]]
    profiles: list[dict[str, str]]
    stub_version: StubVersion | None
    signature: signature_report.SignatureReport
    prediction: pcr11.Pcr11Prediction
    pcrsig: list[pcr11.PcrSigCheck] | None
    warnings: list[str] = field(default_factory=list)
    # sha256 (and bank) hash objects per section index, after the pass: callers
    # may .copy() one to hash data that starts with that section (staging's initrd).
    section_hashes: dict[int, dict[str, hashlib._Hash]] = field(default_factory=dict,
                                                               repr=False)

    def to_json(self) -> dict:
        pred = self.prediction
        pcrsig = None
        if self.pcrsig is not None:
            pcrsig = {}
            for check in self.pcrsig:
                pcrsig.setdefault(check.bank, {})[check.phase] = {
                    "matches": check.matches, "signature_valid": check.signature_valid}
        return {
            "path": self.path,
            "size": self.size,
            "machine": self.machine,
            "profile": self.profile,
            "sections": [
                {"name": s.name, "size": s.size, "sha256": s.sha256, "offset": s.offset,
                 "index": s.index, "used": s.used}
                for s in self.sections
            ],
            "os_release": self.os_release,
            "uname": self.uname,
            "cmdline": self.cmdline,
            "sbat": self.sbat,
            "profiles": self.profiles,
            "stub_version": self.stub_version.text if self.stub_version else None,
            "signature": dataclasses.asdict(self.signature),
            "measured_sections": [s.name for s in pred.sections],
            "not_measured": [{"section": n, "why": why} for n, why in pred.not_measured],
            "pcr11": {bank: value.hex() for bank, value in pred.after_sections.items()},
            "pcr11_phases": {
                phase: {bank: value.hex() for bank, value in values.items()}
                for phase, values in pred.phases.items()
            },
            "pcrsig": pcrsig,
            "warnings": self.warnings,
        }


def inspect_image(
    image: UkiImage,
    *,
    profile: int | None = None,
    banks: tuple[str, ...] = pcr11.BANKS,
    phases: tuple[str, ...] = pcr11.DEFAULT_PHASES,
    trusted: list | Callable[[], list] | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_sinks: list[hashing.Sink] | None = None,
) -> ImageReport:
    """`extra_sinks` ride along in the same read pass (staging uses them for
    the kernel and initrd digests). `trusted` may be a function returning the
    certificates: it is called once the hashes are done, so they can load meanwhile."""
    resolved = image.resolve(profile)
    stub = image.stub_version()
    warnings: list[str] = []
    if image.profiles and stub is not None and stub.major < 257:
        warnings.append(
            f"the embedded systemd-stub {stub.text} predates multi-profile UKIs (257); "
            "booted by firmware it would ignore the profile split")
    if stub is None:
        warnings.append("no systemd-stub version found (.sdmagic); predicting PCR 11 for the "
                        "newest stub")
    used = {s.index for s in resolved.sections.values()}
    present = {name: s.virtual_size for name, s in resolved.sections.items()}
    for name, candidates in resolved.multi.items():
        if candidates:
            present[name] = candidates[0].virtual_size
    measured, not_measured = pcr11.order_for_measurement(
        present, stub.major if stub else None)

    # One sink per (section, bank): sha256 of every section for the listing,
    # every requested bank for the measured ones.
    section_hashes: dict[int, dict[str, hashlib._Hash]] = {}
    sinks: list[hashing.Sink] = []

    def want(section: PeSection, bank: str) -> None:
        per = section_hashes.setdefault(section.index, {})
        if bank in per:
            return
        per[bank] = hashlib.new(bank)
        sinks.append(hashing.Sink(
            per[bank],
            [(section.raw_offset, section.payload_size)] if section.payload_size else [],
            section.virtual_size - section.payload_size,
        ))

    for section in image.headers.sections:
        want(section, "sha256")
    for name in measured:
        for bank in banks:
            want(resolved.sections[name], bank)

    # Authenticode: images are signed with SHA-256 in practice, so that digest
    # is hashed speculatively in the same pass while the signatures are parsed
    # (importing the crypto libraries costs as much as hashing 100 MB). Any
    # other algorithm a signature names gets a second, rare pass.
    digest_hashes: dict[str, hashlib._Hash] = {}
    if image.headers.cert_table_size:
        digest_hashes["sha256"] = hashlib.sha256()
        sinks.append(hashing.Sink(digest_hashes["sha256"],
                                  pe.authenticode_ranges(image.headers)))

    sinks.extend(extra_sinks or [])
    hashing_error: list[BaseException] = []
    abandon = threading.Event()

    def on_progress(done: int, total: int) -> None:
        if abandon.is_set():
            raise _Abandoned
        if progress:
            progress(done, total)

    def run_hashes() -> None:
        try:
            hashing.feed(image.fd, sinks, overlays=image.overlays, progress=on_progress)
        except BaseException as exc:  # re-raised in the caller's thread
            hashing_error.append(exc)

    # Every range was bounds-checked by our own header parse, so hashing can start
    # before pefile's cross-check and the crypto imports, which run meanwhile on
    # this thread (hashlib releases the GIL): they cost as much as hashing a
    # quarter of a 100 MB image.
    worker = threading.Thread(target=run_hashes, name="relaunchd-hash", daemon=True)
    worker.start()
    signed = bool(image.headers.cert_table_size)
    try:
        image.confirm_headers()
        signatures = []
        if signed:
            from relaunchd.formats import authenticode

            signatures = authenticode.read_signatures(image.fd, image.headers)
    except BaseException:
        abandon.set()
        raise
    finally:
        worker.join()
    if hashing_error:
        exc = hashing_error[0]
        if isinstance(exc, OSError):
            raise InvalidImage(f"{image.path}: read failed: {exc}") from None
        raise exc
    digests = {alg: h.digest() for alg, h in digest_hashes.items()}
    extra = {s.digest_algorithm for s in signatures} & _DIGEST_ALGORITHMS - set(digests)
    if extra:
        digests.update(authenticode.compute_digests(image.fd, image.headers, extra,
                                                   overlays=image.overlays))
    # An unsigned image is judged without cryptography (sigreport keeps that import away).
    if callable(trusted):
        trusted = trusted()
    signature = (authenticode.verify(signatures, digests, trusted or []) if signed
                 else signature_report.unsigned())

    sections = [
        SectionInfo(name=s.name, index=s.index, offset=s.raw_offset, size=s.virtual_size,
                    sha256=section_hashes[s.index]["sha256"].hexdigest(), used=s.index in used)
        for s in image.headers.sections
    ]
    prediction = pcr11.predict(
        [pcr11.MeasuredSection(
            name=name, size=resolved.sections[name].virtual_size,
            digests={b: section_hashes[resolved.sections[name].index][b].digest() for b in banks})
         for name in measured],
        banks, phases)
    prediction.not_measured = not_measured

    pcrsig = None
    if ".pcrsig" in resolved.sections:
        try:
            entries = pcr11.parse_pcrsig(image.read_section(resolved.sections[".pcrsig"]))
            pkey = (image.read_section(resolved.sections[".pcrpkey"])
                    if ".pcrpkey" in resolved.sections else None)
            pcrsig = pcr11.check_pcrsig(entries, prediction, pkey)
        except pcr11.PcrSigError as exc:
            warnings.append(str(exc))

    return ImageReport(
        path=image.path,
        size=image.size,
        machine=image.headers.machine_name,
        profile=resolved.profile,
        sections=sections,
        os_release=image.os_release(resolved),
        uname=image.uname(resolved),
        cmdline=image.cmdline(resolved),
        sbat=image.sbat(resolved),
        profiles=image.all_profiles(),
        stub_version=stub,
        signature=signature,
        prediction=prediction,
        pcrsig=pcrsig,
        warnings=warnings,
        section_hashes=section_hashes,
    )
