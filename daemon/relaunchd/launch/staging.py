"""Staging: turn a UKI on disk into sealed kernel/initrd/cmdline ready for kexec.

The order is the point (DESIGN "The relaunch, end to end", step 1):
1. open the file once, by descriptor, where the policy allows it (`image_files.open_allowed`:
   walked from the allowed directory without symbolic links, every directory on the way
   and the file root-owned and writable by nobody else, a regular file);
2. copy that descriptor once into a sealed memfd — from here on only that copy is used.
   In the common shape (the initrd is `.initrd` followed by generated cpios)
   the `.initrd` payload goes straight into the initrd memfd instead, which is
   finished and sealed before anything is verified: one copy of 100 MB, not two;
3. parse, hash and verify the copy in one pass (`formats.image_report`), refusing an
   image whose signature does not verify against the configured trust;
4. cut the kernel (`.linux`, trimmed per uki.md §3.3) and build the initrd
   (`initrd`) and command line (`cmdline`) as systemd-stub would, each into
   its own sealed memfd.

Meanwhile a second thread imports what verification needs and loads the
certificates (`_Preload`): the copy runs in the kernel and leaves a core idle.

`load()` then hands them to the kernel; `write_artifacts()` writes them out
for `--dry-run`. A failure at any step closes everything opened so far and
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import (
    InvalidArgument,
    InvalidImage,
    InvalidKernel,
    KexecFailed,
    NotReady,
    RelaunchError,
    VerificationFailed,
)
from relaunchd.formats import addons as addon_rules
from relaunchd.formats import cmdline as cmdline_rules
from relaunchd.formats import hashing, initrd, pe, uki
from relaunchd.formats.image_report import ImageReport, inspect_image
from relaunchd.formats.pe import FileRange
from relaunchd.formats.signature_report import SignatureReport
from relaunchd.formats.x86 import boot_params
from relaunchd.launch import registry
from relaunchd.platform import (
    addon_files,
    image_files,
    kexec_syscalls,
    output_dir,
    sealed_memfd,
)
from relaunchd.platform.sysroot import SysRoot

ID_ARGUMENT = "relaunchd.id"


@dataclass
class StageOptions:
    method: str = "kexec"
    profile: int | None = None
    custom_cmdline: str | None = None
    append: list[str] = field(default_factory=list)
    trusted: list = field(default_factory=list)      # trust_store.load_certificates()
    certificate_files: list[str] = field(default_factory=list)  # loaded while copying
    allow_unsigned: bool = False                     # explicit, insecure
    policy: image_files.ImagePolicy = field(
        default_factory=lambda: image_files.ImagePolicy(image_files.DEFAULT_IMAGE_DIRS))
    relaunch_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    add_id_argument: bool = True
    banks: tuple[str, ...] = ("sha256",)
    root: SysRoot = field(default_factory=SysRoot)
    loader: str | None = None            # "file" | "segments"; None: by method
    # Where the launch method looks (configured ACM directories, DL handler): the same
    # probe configuration the engine's Capabilities come from; None: the probe's defaults.
    probe_config: Any = None             # readiness.ProbeConfig
    sinit_acm: str | None = None         # explicit TXT inputs, platform paths under `root`
    dl_handler: str | None = None
    require_drtm: bool = False           # launch.require_drtm: the DL handler resets, not returns
    addons: bool = True                  # apply add-ons as systemd-stub would (addons.py)
    boot_partition: str | None = None    # where loader/addons/ is; None: the image's mount

    @property
    def effective_loader(self) -> str:
        return self.loader or registry.method(self.method).default_loader


@dataclass
class SealedPart:
    """A sealed memfd and what it holds."""

    name: str
    fd: int
    size: int
    sha256: str

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class StagedImage:
    id: str
    source: str
    method: str
    report: ImageReport | None       # None: not a UKI (a Type #1 boot entry, entry_staging)
    image: SealedPart
    kernel: SealedPart
    initrd: SealedPart | None
    initrd_parts: list[str]
    cmdline: cmdline_rules.Cmdline
    notes: list[str] = field(default_factory=list)
    loader: str = "file"
    segment_plan: Any = None             # segments.SegmentPlan for the segment loader
    slrt: bytes | None = None
    drtm_seal_pcr: int | None = None     # segment loader: the SLRT policy's sealing PCR
    drtm_events: list = field(default_factory=list)   # slrt.PredictedEvent, policy order
    addons: list[dict] = field(default_factory=list)  # addons.describe(): what was applied
    dl_handler: dict | None = None       # txt: the handler file's path, sha256, size, entry
    dl_handler_file: bytes | None = None  # txt: the handler as installed (it is measured)

    def close(self) -> None:
        for blob in (self.image, self.kernel, self.initrd):
            if blob is not None:
                blob.close()

    def plan(self) -> dict:
        """What `plan.json` records: every artefact with size and digest, the
        method, the PCR 11 predictions of the image."""
        report = self.report.to_json() if self.report is not None else {}
        return {
            "id": self.id,
            "source": self.source,
            "method": self.method,
            "profile": report.get("profile"),
            "image": {"size": self.image.size},
            "kernel": {"size": self.kernel.size, "sha256": self.kernel.sha256},
            "initrd": ({"size": self.initrd.size, "sha256": self.initrd.sha256,
                        "parts": self.initrd_parts} if self.initrd else None),
            "cmdline": self.cmdline.text,
            "signature": report.get("signature"),
            "pcr11": report.get("pcr11"),
            "pcr11_phases": report.get("pcr11_phases"),
            "loader": self.loader,
            "segments": self.segment_plan.to_json() if self.segment_plan else None,
            "slrt": ({"address": self.segment_plan.slrt_address, "size": len(self.slrt),
                      "sha256": hashlib.sha256(self.slrt).hexdigest()}
                     if self.slrt is not None else None),
            "drtm": ({"seal_pcr": self.drtm_seal_pcr, "events": [
                {"pcr": e.pcr, "label": e.label, "event_type": e.event_type,
                 "digests": {bank: value.hex() for bank, value in e.digests.items()}}
                for e in self.drtm_events]} if self.drtm_seal_pcr is not None else None),
            "addons": self.addons,
            "dl_handler": self._dl_handler_plan(),
            "notes": self.notes + self.cmdline.notes,
        }


    def _dl_handler_plan(self) -> dict | None:
        """The TXT DL handler: the file's SHA-256 (what the PCR 23 log should name) and
        the staged segment (parameter block filled in)."""
        if self.dl_handler is None or self.segment_plan is None:
            return None
        seg = self.segment_plan.segment("dl-handler")
        return {**self.dl_handler, "address": seg.address, "memsz": seg.memsz,
                "entry": self.dl_handler["entry_offset"] + seg.address}


def prepare(path: str, options: StageOptions,
            progress: Callable[[str, int, int], None] | None = None) -> StagedImage:
    launch = registry.method(options.method)       # InvalidArgument for an unknown one
    if options.effective_loader not in ("file", "segments"):
        raise InvalidArgument(f"unknown loader {options.loader!r}")
    if launch.default_loader == "segments" and options.effective_loader != "segments":
        raise InvalidArgument(f"the {options.method} method needs the segment loader")
    inputs = _launch_inputs(options)     # refuses up front, before any work
    preload = _Preload(options)
    opened: list[SealedPart] = []
    found: list[addon_rules.Addon] = []
    try:
        # The one descriptor everything is read from; `path` stays the name the caller
        # gave (StagedImage.source, plan.json).
        with image_files.open_allowed(path, options.policy) as original:
            if options.addons:
                found = addon_files.discover(original, options.policy,
                                             options.boot_partition)
            image_blob, detached = _sealed_image(original, path, options, found)
        opened.append(image_blob)
        initrd_blob = None
        if detached is not None:
            initrd_blob = SealedPart("initrd", detached.fd, detached.length, "")
            opened.append(initrd_blob)
        # The pefile cross-check runs inside inspect_image, overlapped with hashing.
        with uki.from_fd(image_blob.fd, path, confirm=False, detached=detached) as image:
            resolved = image.resolve(options.profile)
            kernel_range, cmdline_limit = _kernel_range(image, resolved, path)
            chosen = _select_addons(image, resolved, found)
            parts = initrd.plan(image, resolved, ucode_addons=chosen.ucode,
                                initrd_addons=chosen.initrd)
            if initrd_blob is not None:
                # The sealed headers must put `.initrd`, first in the initrd, exactly
                # where the original's did when the copy was split.
                if not (_initrd_extends_section(parts)
                        and parts[0].source == pe.FileRange(detached.fd, 0, detached.length)):
                    raise InvalidImage(f"{path}: changed while it was copied (its .initrd "
                                       "moved); stage it again")
                # Finished and sealed before anything is verified: the `.initrd`
                # bytes are hashed from this memfd, the one kexec gets.
                initrd_blob.size = initrd.write(parts, initrd_blob.fd, first_in_place=True)
                sealed_memfd.seal(initrd_blob.fd)
            # Kernel and initrd digests come from the same single read of the
            # sealed copy as the verification (the memfds are copies of it);
            # where they equal or start with a section, that section's hash is
            # reused instead of hashing the bytes again.
            linux = resolved.sections[".linux"]
            kernel_is_section = (kernel_range.length == linux.payload_size
                                 == linux.virtual_size)
            initrd_from_section = _initrd_extends_section(parts)
            kernel_hash, initrd_hash = hashlib.sha256(), hashlib.sha256()
            extra = [] if kernel_is_section else [
                hashing.Sink(kernel_hash, [(kernel_range.offset, kernel_range.length)])]
            initrd_pieces = None if initrd_from_section else _initrd_pieces(parts, image.fd)
            if parts and initrd_pieces is not None:
                extra.append(hashing.Sink(initrd_hash, initrd_pieces))
            report = inspect_image(
                image, profile=options.profile, banks=options.banks,
                trusted=preload.certificates,
                progress=(lambda d, t: progress("verifying", d, t)) if progress else None,
                extra_sinks=extra)
            trusted = preload.certificates()
            require_verified(path, report.signature, options, trusted)
            addon_rules.verify(chosen, trusted, options.allow_unsigned)
            if kernel_is_section:
                kernel_hash = report.section_hashes[linux.index]["sha256"]
            if initrd_from_section:
                initrd_hash = _continue_initrd_hash(
                    report.section_hashes[resolved.sections[".initrd"].index]["sha256"], parts)
            kernel = _sealed_part("kernel", image.fd, kernel_range, kernel_hash.hexdigest())
            opened.append(kernel)
            if initrd_blob is not None:
                initrd_blob.sha256 = initrd_hash.hexdigest()
            elif parts:
                initrd_blob = _initrd(parts, initrd_hash.hexdigest()
                                      if initrd_from_section or initrd_pieces is not None
                                      else None)
                opened.append(initrd_blob)
            secure_boot = _secure_boot(options.root)
            args = list(options.append)
            if options.add_id_argument:
                args.append(f"{ID_ARGUMENT}={options.relaunch_id}")
            line = cmdline_rules.compose(image.cmdline(resolved), custom=options.custom_cmdline,
                                         secure_boot=bool(secure_boot), addons=chosen.cmdlines,
                                         extra=args, limit=cmdline_limit)
        notes = list(chosen.notes)
        if secure_boot is None:
            notes.append("Secure Boot state unknown (no efivarfs): treated as off for the "
                         "command-line rule")
        staged = StagedImage(id=options.relaunch_id, source=path, method=options.method,
                             report=report, image=image_blob, kernel=kernel,
                             initrd=initrd_blob, initrd_parts=[p.label for p in parts],
                             cmdline=line, notes=notes, loader=options.effective_loader,
                             addons=addon_rules.describe(chosen))
        if staged.loader == "segments":
            add_segment_plan(staged, options, inputs)
        return staged
    except BaseException:
        for blob in opened:
            blob.close()
        raise
    finally:
        # Their bytes are in the initrd memfd and the command line by now.
        for addon in found:
            addon.close()


def _select_addons(image: uki.UkiImage, resolved: uki.ResolvedImage,
                   found: list[addon_rules.Addon]) -> addon_rules.AddonSelection:
    stub = image.stub_version()
    return addon_rules.select(found, stub_major=stub.major if stub else None,
                              uki_uname=image.text(resolved, ".uname"))


def _launch_inputs(options: StageOptions) -> Any:
    """Segment-loader inputs from the launch method; refuses what cannot work before
    anything is read."""
    if options.effective_loader != "segments":
        return None
    lockdown = _lockdown(options.root)
    if lockdown in ("integrity", "confidentiality"):
        raise NotReady(f"kernel lockdown ({lockdown}) refuses kexec_load, which the segment "
                       "loader needs; only --loader file (kexec_file_load) works here")
    # Imported here, as the segment loader below: a plain kexec stage (the common case,
    # and `make bench`'s) never needs the probe or the launch modules (~45 ms).
    from relaunchd.launch.protocol import LaunchRequest
    from relaunchd.platform.readiness import ProbeConfig

    request = LaunchRequest(root=options.root,
                            probe_config=options.probe_config or ProbeConfig(options.root.root),
                            sinit_acm=options.sinit_acm, dl_handler=options.dl_handler,
                            require_drtm=options.require_drtm)
    return registry.method(options.method).segment_inputs(request)


def _lockdown(root: SysRoot) -> str | None:
    from relaunchd.platform.secure_boot import read_lockdown

    read = read_lockdown(root)
    return read.value if read.ok else None


class _Preload:
    """pefile and cryptography imported, and `certificate_files` loaded, on a second
    thread while the image is copied: the copy runs in the kernel and leaves a core
    idle, and these imports (~60 ms) would otherwise delay the hash pass or compete
    with it for the cores."""

    def __init__(self, options: StageOptions):
        self._files = list(options.certificate_files)
        self._trusted = list(options.trusted)
        self._signed = bool(self._files or self._trusted)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relaunchd-preload",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import pefile  # noqa: F401  (for the header cross-check)

            if self._signed:
                from relaunchd.formats import authenticode  # noqa: F401  (cryptography)
                from relaunchd.platform import trust_store
        except ImportError:
            return    # the import where it is needed reports it
        if self._files:
            try:
                self._trusted += trust_store.load_certificates(self._files)
            except BaseException as exc:  # re-raised by certificates()
                self._error = exc

    def certificates(self) -> list:
        """Every trusted certificate: the given ones and those loaded from files."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._trusted


def _sealed_image(source: image_files.ImageFile, path: str, options: StageOptions,
                  found: list[addon_rules.Addon],
                  ) -> tuple[SealedPart, pe.DetachedRange | None]:
    """The sealed copy of `source`, and where its `.initrd` went instead when it was
    split off (the image copy has a hole there; see `split_copy`)."""
    # Parsed only to refuse a non-UKI before copying it and to find `.initrd`; the
    # sealed copy is what gets checked.
    with uki.from_fd(source.fd, path, confirm=False) as original:
        split = _detachable_initrd(original, options.profile, found)
        fd, part = sealed_memfd.split_copy(original.fd, os.path.basename(path), original.size,
                                           detach=split)
    detached = pe.DetachedRange(split[0], split[1], part) if part is not None else None
    return SealedPart("image", fd, os.fstat(fd).st_size, ""), detached


def _detachable_initrd(original: uki.UkiImage, profile: int | None,
                       found: list[addon_rules.Addon]) -> tuple[int, int] | None:
    """The `.initrd` payload range, if the initrd the stub builds starts with it and
    has only generated cpios after it (no `.ucode`, no initrd add-ons): then that
    payload can be copied straight into the initrd memfd. Read from the original
    file, so only a guess that `prepare` confirms on the sealed copy."""
    try:
        resolved = original.resolve(profile)
        chosen = _select_addons(original, resolved, found)
        parts = initrd.plan(original, resolved, ucode_addons=chosen.ucode,
                            initrd_addons=chosen.initrd)
    except RelaunchError:
        return None      # the sealed copy gets the same error, authoritatively
    if not _initrd_extends_section(parts):
        return None
    return parts[0].source.offset, parts[0].source.length


def require_verified(path: str, signature: SignatureReport, options: StageOptions,
                     trusted: list, what: str = "image") -> None:
    """A signature that verifies against `trusted`, or unsigned staging explicitly allowed
    with no trust configured at all (a UKI's, or a boot loader entry's kernel)."""
    if signature.verified or (options.allow_unsigned and not trusted):
        return
    if not trusted:
        raise VerificationFailed(f"{path}: no trusted certificates configured; refusing to "
                                 f"stage an unverified {what}")
    why = "; ".join(signature.reasons) or "no signature verifies"
    raise VerificationFailed(f"{path}: {why}")


def _kernel_range(image: uki.UkiImage, resolved: uki.ResolvedImage,
                  path: str) -> tuple[pe.FileRange, int | None]:
    """`.linux` payload; if it is itself a signed PE, trimmed to the end of its
    certificate table so the kernel's own signature check sees the signed
    bytes exactly (uki.md §3.3). Also the command-line budget kexec_file_load
    leaves with this kernel (x86: from its setup header; None elsewhere)."""
    payload = image.payload(resolved.sections[".linux"])
    length = payload.length
    try:
        inner = pe.parse_headers(payload)
        if inner.cert_table_size:
            length = min(length, inner.cert_table_offset + inner.cert_table_size)
    except InvalidImage:
        pass   # not a PE (e.g. a raw arm64 Image): use the payload as is
    kernel = payload.sub(0, length)
    if os.uname().machine != "x86_64":
        return kernel, None
    try:
        header = boot_params.parse_setup_header(kernel)
    except InvalidKernel as exc:
        raise InvalidImage(f"{path}: .linux is not a usable x86 bzImage: {exc}") from None
    return kernel, max(0, header.cmdline_size - cmdline_rules.KEXEC_FILE_X86_RESERVE)


def _sealed_part(name: str, src_fd: int, source: pe.FileRange, sha256: str) -> SealedPart:
    fd = sealed_memfd.create(name)
    try:
        sealed_memfd.copy_range(src_fd, source.offset, source.length, fd)
        sealed_memfd.seal(fd)
        return SealedPart(name, fd, source.length, sha256)
    except BaseException:
        os.close(fd)
        raise


def _initrd_extends_section(parts: list[initrd.InitrdPart]) -> bool:
    """The common shape: `.initrd` first, then only generated cpios."""
    return bool(parts) and parts[0].label == ".initrd" and all(
        p.source is None for p in parts[1:])


def _continue_initrd_hash(section_hash, parts: list[initrd.InitrdPart]):
    """The `.initrd` section's sha256 state covers exactly the first part's
    content (payload + zeros to VirtualSize): continue a copy of it with the
    padding and the generated cpios."""
    digest = section_hash.copy()
    first = parts[0]
    digest.update(bytes(first.size - first.content_size))
    for part in parts[1:]:
        digest.update(part.data + bytes(part.size - part.content_size))
    return digest


def _initrd_pieces(parts: list[initrd.InitrdPart], image_fd: int) -> list | None:
    """The initrd as hashing pieces (file ranges of the image and literal bytes), or
    None when its file ranges are not in file order or not all in the image (add-ons):
    then it is hashed after being written."""
    pieces: list = []
    last = -1
    for part in parts:
        if part.source is not None:
            if part.source.fd != image_fd or part.source.offset < last:
                return None
            pieces.append((part.source.offset, part.source.length))
            last = part.source.offset + part.source.length
        tail = bytes(part.zero_fill) + part.data + bytes(part.size - part.content_size)
        if tail:
            pieces.append(tail)
    return pieces


def _initrd(parts: list[initrd.InitrdPart], sha256: str | None) -> SealedPart:
    fd = sealed_memfd.create("initrd")
    try:
        size = initrd.write(parts, fd)
        sealed_memfd.seal(fd)
        if sha256 is None:
            digest = hashlib.sha256()
            hashing.feed(fd, [hashing.Sink(digest, [(0, size)])])
            sha256 = digest.hexdigest()
        return SealedPart("initrd", fd, size, sha256)
    except BaseException:
        os.close(fd)
        raise


def _secure_boot(root: SysRoot) -> bool | None:
    from relaunchd.platform.secure_boot import read_efi_bool

    if not root.is_dir("/sys/firmware/efi"):
        return False
    read = read_efi_bool(root, "SecureBoot")
    return read.value if read.ok else None


# ------------------------------------------------------------------ load / unload / dry run


def load(staged: StagedImage, root: SysRoot) -> None:
    """kexec_file_load the staged kernel, initrd and command line, then
    confirm /sys/kernel/kexec_loaded reads 1."""
    if staged.loader == "segments":
        from relaunchd.launch import segment_loader

        segment_loader.load(staged.segment_plan)
    else:
        kexec_syscalls.file_load(staged.kernel.fd,
                                 staged.initrd.fd if staged.initrd else None,
                                 staged.cmdline.nul_terminated)
    if loaded(root) is not True:
        raise KexecFailed("the kexec load returned success but /sys/kernel/kexec_loaded "
                          "is not 1")


def unload(root: SysRoot) -> None:
    kexec_syscalls.file_unload()
    if loaded(root) is True:
        raise KexecFailed("unload returned success but /sys/kernel/kexec_loaded is still 1")


def loaded(root: SysRoot) -> bool | None:
    read = root.read_line("/sys/kernel/kexec_loaded")
    if not read.ok or read.value is None:
        return None
    return read.value.strip() == "1"


def add_segment_plan(staged: StagedImage, options: StageOptions, inputs: Any) -> None:
    """The segment loader's zero page, SLRT, DL handler and DRTM predictions for a staged
    kernel (a UKI's or a boot loader entry's): `inputs` are the method's SegmentInputs."""
    from relaunchd.launch import segment_loader

    initrd = staged.initrd
    staged.segment_plan, content = segment_loader.plan(
        FileRange(staged.kernel.fd, 0, staged.kernel.size),
        FileRange(initrd.fd, 0, initrd.size) if initrd else None,
        staged.cmdline.nul_terminated, options.root, inputs)
    staged.slrt = content.table
    if inputs.txt is not None:
        staged.dl_handler = {"path": inputs.txt.handler_path,
                             "sha256": inputs.txt.handler_sha256,
                             "size": len(inputs.txt.handler.data),
                             "entry_offset": inputs.txt.handler.header.entry_offset}
        staged.dl_handler_file = inputs.txt.handler.data
    # What a Secure Launch kernel will extend into the sealing PCR, from our own SLRT
    # policy; the next boot checks the DRTM log against it.
    staged.drtm_seal_pcr = content.seal_pcr
    staged.drtm_events = segment_loader.predicted_events(
        content, cmdline=staged.cmdline.nul_terminated,
        initrd_digests={"sha256": bytes.fromhex(initrd.sha256)} if initrd else None)
    if inputs.txt is None:
        staged.notes.append(
            "hand-off rehearsal: no DCE/DL handler, so the SLRT carries no dynamic "
            "launch; only for a next kernel that is not a Secure Launch kernel")


def write_artifacts(staged: StagedImage, directory: str) -> list[str]:
    """`--dry-run --output DIR`: kernel, initrd, cmdline, plan.json, and for the
    segment loader slrt.bin and bootparams.bin (for txt also dl-handler.bin, the handler
    as staged). DIR and every file are opened as
    `output_dir` says (a directory of the caller's, O_EXCL | O_NOFOLLOW, all or
    nothing); the kernel and initrd are copied from their sealed memfds in the kernel."""
    files: list[tuple[str, output_dir.Writer]] = []
    for blob in (staged.kernel, staged.initrd):
        if blob is not None:
            files.append((blob.name, _copy_of(blob)))
    files.append(("cmdline", _bytes_of(staged.cmdline.nul_terminated)))
    if staged.segment_plan is not None:
        files.append(("slrt.bin", _bytes_of(staged.slrt or b"")))
        files.append(("bootparams.bin", _bytes_of(staged.segment_plan.zero_page)))
        if staged.dl_handler is not None:
            # The handler as staged: its parameter block filled in.
            files.append(("dl-handler.bin",
                          _bytes_of(staged.segment_plan.segment("dl-handler").data)))
    plan = (json.dumps(staged.plan(), indent=2) + "\n").encode()
    files.append(("plan.json", _bytes_of(plan)))
    with output_dir.open_output_directory(directory) as out:
        return out.write_all(files)


def _copy_of(blob: SealedPart) -> output_dir.Writer:
    return lambda fd: sealed_memfd.copy_range(blob.fd, 0, blob.size, fd)


def _bytes_of(data: bytes) -> output_dir.Writer:
    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write
