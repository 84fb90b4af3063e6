"""Staging a boot loader entry (launch layer): what the boot loader would start, copied,
verified and built for kexec as honestly as a UKI.

A Type #2 entry is a UKI (`EFI/Linux/*.efi`): `staging.prepare` on its path, under the
image policy like any other UKI, with the entry's partition as the home of the global
add-ons (`loader/addons/`), as systemd-stub would find them.

A Type #1 entry (`loader/entries/*.conf`) is built as systemd-boot 252 boots it
(src/boot/efi/boot.c: image_start, initrd_prepare):
- the kernel: the `linux` file, opened by descriptor below its partition
  (`platform.boot_entries.open_files`), copied once into a sealed memfd, whose
  Authenticode signature is verified against the configured trust — a distribution-signed
  vmlinuz is a signed PE like a UKI's `.linux` — and which is the kernel kexec gets;
- the initrd: the `initrd` files concatenated byte for byte in the entry's order, empty
  files skipped (initrd_prepare), into one sealed memfd;
- the command line: `options`, then the configured and requested additions and
  `relaunchd.id`. The loader also puts `initrd=\\path` words in front, for kernels that
  read their initrd from the ESP themselves; a relaunch hands the initrd over directly,
  so they are left out.
No one signs a Type #1 entry's initrd or options: `require_signed_parts` refuses them
unless the configuration allows unsigned parts, and their digests are measured into the
PCR 23 log like a UKI's (the engine measures whatever `StagedImage` carries).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaunchd.errors import InvalidBootEntry, InvalidImage, InvalidKernel, VerificationFailed
from relaunchd.formats import boot_entries as entry_rules
from relaunchd.formats import cmdline as cmdline_rules
from relaunchd.formats import hashing, pe
from relaunchd.formats.pe import FileRange
from relaunchd.formats.signature_report import SignatureReport
from relaunchd.formats.x86 import boot_params
from relaunchd.launch import registry, staging
from relaunchd.launch.staging import SealedPart, StagedImage, StageOptions
from relaunchd.platform import boot_entries, sealed_memfd
from relaunchd.platform.boot_entries import EntryFiles, ListedEntry
from relaunchd.platform.sysroot import SysRoot

# The configuration key that lets unsigned parts through; every refusal names it.
ALLOW_UNSIGNED_KEY = "trust.allow_unsigned_initrd"

Progress = Callable[[str, int, int], None]


@dataclass
class StagedEntry(StagedImage):
    """A Type #1 entry staged: no UKI and so no ImageReport; the kernel's own signature
    verdict instead, and the entry it came from."""

    signature: SignatureReport | None = None
    entry: dict[str, Any] = field(default_factory=dict)      # ListedEntry.staged_record()

    def plan(self) -> dict:
        plan = super().plan()
        plan["signature"] = (dataclasses.asdict(self.signature)
                             if self.signature is not None else None)
        plan["entry"] = self.entry
        return plan


def require_signed_parts(listed: ListedEntry, allow_unsigned: bool) -> None:
    """VerificationFailed, naming the configuration key, if parts of the entry that no
    signature covers (a Type #1 entry's initrd and options) are not allowed."""
    unsigned = listed.entry.unsigned_parts
    if unsigned and not allow_unsigned:
        raise VerificationFailed(
            f"boot entry {listed.id}: its {' and '.join(unsigned)} are signed by no one (a "
            f"Type #1 entry's signature covers only the kernel); set {ALLOW_UNSIGNED_KEY}: "
            "true to stage it anyway (they are measured into the PCR log either way)")


def require_reproducible(listed: ListedEntry) -> None:
    """InvalidBootEntry for what a relaunch cannot hand over as the loader would: kexec
    passes the running kernel's device tree, not the entry's."""
    entry = listed.entry
    if entry.type == entry_rules.TYPE1 and (entry.devicetree or entry.devicetree_overlay):
        raise InvalidBootEntry(f"boot entry {listed.id} names a device tree; kexec hands the "
                               "next kernel the running one, so the relaunch would not boot "
                               "what the loader boots")


def uki_path(root: SysRoot, listed: ListedEntry) -> str:
    """The host path of a Type #2 entry's UKI (what `staging.prepare` and the image policy
    take)."""
    platform_path = listed.path(listed.entry.kernel)
    if listed.entry.type != entry_rules.TYPE2 or platform_path is None:
        raise InvalidBootEntry(f"boot entry {listed.id} is not a UKI")
    return root.host_path(platform_path)


def prepare(listed: ListedEntry, options: StageOptions, *, allow_unsigned_parts: bool,
            progress: Progress | None = None) -> StagedImage:
    """Stage `listed` (either type) under `options`; refuses what cannot be staged
    (InvalidBootEntry), unsigned parts not allowed or a kernel that does not verify
    (VerificationFailed). A failure leaves nothing open."""
    boot_entries.require_stageable(listed, require_verified=False)
    require_reproducible(listed)
    require_signed_parts(listed, allow_unsigned_parts)
    if options.custom_cmdline is not None or options.profile is not None:
        raise InvalidBootEntry(f"boot entry {listed.id}: staged as the loader boots it; a "
                               "custom command line or profile does not apply (use append)")
    if listed.entry.type == entry_rules.TYPE2:
        partition = options.root.host_path(listed.partition.path)
        return staging.prepare(uki_path(options.root, listed),
                               dataclasses.replace(options, boot_partition=partition),
                               progress)
    return _prepare_type1(listed, options, progress)


def _prepare_type1(listed: ListedEntry, options: StageOptions,
                   progress: Progress | None) -> StagedEntry:
    launch = registry.method(options.method)       # InvalidArgument for an unknown one
    if launch.default_loader == "segments" and options.effective_loader != "segments":
        raise InvalidBootEntry(f"the {options.method} method needs the segment loader")
    # The same refusals and inputs as a UKI stage, before any work.
    inputs = staging._launch_inputs(options)
    preload = staging._Preload(options)
    source = listed.path(listed.entry.source) or listed.id
    opened: list[SealedPart] = []
    try:
        with boot_entries.open_files(options.root, listed) as files:
            kernel_path = listed.path(listed.entry.kernel) or source
            if progress:
                progress("copying", 0, 2)
            image = _sealed_file("image", files.kernel, kernel_path)
            opened.append(image)
            if progress:
                progress("copying", 1, 2)
            initrd, parts, notes = _initrd(files)
            if initrd is not None:
                opened.append(initrd)
        kernel, signature, limit = _kernel(image, kernel_path, options, preload, progress)
        opened.append(kernel)
        args = list(options.append)
        if options.add_id_argument:
            args.append(f"{staging.ID_ARGUMENT}={options.relaunch_id}")
        line = cmdline_rules.compose(listed.entry.options, extra=args, limit=limit)
        staged = StagedEntry(
            id=options.relaunch_id, source=source, method=options.method, report=None,
            image=image, kernel=kernel, initrd=initrd, initrd_parts=parts, cmdline=line,
            notes=notes, loader=options.effective_loader, signature=signature,
            entry=listed.staged_record())
        if staged.loader == "segments":
            staging.add_segment_plan(staged, options, inputs)
        return staged
    except BaseException:
        for blob in opened:
            blob.close()
        raise


def _sealed_file(name: str, fd: int, path: str) -> SealedPart:
    """The whole file behind `fd` as it is now, in a sealed memfd."""
    try:
        copy = sealed_memfd.sealed_copy(fd, os.path.basename(path))
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot copy: {exc.strerror or exc}") from None
    return SealedPart(name, copy, os.fstat(copy).st_size, "")


def _initrd(files: EntryFiles) -> tuple[SealedPart | None, list[str], list[str]]:
    """The entry's initrds concatenated in order, empty ones skipped, sealed and hashed
    from the memfd kexec gets; the paths used and notes."""
    used: list[str] = []
    notes: list[str] = []
    fd = sealed_memfd.create("initrd")
    try:
        size = 0
        for path, source in files.initrds:
            length = os.fstat(source).st_size
            if length == 0:
                notes.append(f"initrd {path} is empty: skipped, as the boot loader does")
                continue
            try:
                sealed_memfd.copy_range(source, 0, length, fd)
            except InvalidImage as exc:
                raise InvalidImage(f"{path}: {exc}") from None
            size += length
            used.append(path)
        if not used:
            os.close(fd)
            return None, [], notes
        if os.fstat(fd).st_size != size:
            raise InvalidImage("the initrd copy is incomplete")
        sealed_memfd.seal(fd)
        digest = hashlib.sha256()
        hashing.feed(fd, [hashing.Sink(digest, [(0, size)])])
        return SealedPart("initrd", fd, size, digest.hexdigest()), used, notes
    except BaseException:
        os.close(fd)
        raise


def _kernel(image: SealedPart, path: str, options: StageOptions, preload: Any,
            progress: Progress | None) -> tuple[SealedPart, SignatureReport, int | None]:
    """Verify the sealed copy, which is the kernel kexec gets: the whole file, as the
    loader loads it (no section padding to cut, unlike a UKI's `.linux`; bytes after
    the certificate table fail the signature, as with sbverify). Also the command-line
    budget kexec_file_load leaves with this kernel (x86), as for a UKI."""
    whole = FileRange(image.fd, 0, image.size)
    kernel_hash = hashlib.sha256()
    try:
        headers = pe.parse_headers(whole)
    except InvalidImage as exc:
        hashing.feed(image.fd, [hashing.Sink(kernel_hash, [(0, image.size)])])
        signature = _unsigned(f"{path}: not a PE image ({exc}); an unsigned kernel cannot "
                              "verify")
    else:
        signature = _verify(image.fd, headers, image.size, kernel_hash, preload, progress)
    staging.require_verified(path, signature, options, preload.certificates(), "kernel")
    limit = None
    if os.uname().machine == "x86_64":
        try:
            header = boot_params.parse_setup_header(whole)
        except InvalidKernel as exc:
            raise InvalidImage(f"{path}: not a usable x86 bzImage: {exc}") from None
        limit = max(0, header.cmdline_size - cmdline_rules.KEXEC_FILE_X86_RESERVE)
    # A second descriptor of the same sealed memfd, so each part closes its own.
    kernel = SealedPart("kernel", os.dup(image.fd), image.size, kernel_hash.hexdigest())
    return kernel, signature, limit


def _verify(fd: int, headers: pe.PeHeaders, length: int, kernel_hash: Any, preload: Any,
            progress: Progress | None) -> SignatureReport:
    """Authenticode over the sealed copy and the kernel's sha256, in one read pass."""
    # Imported on use: cryptography costs ~40 ms, which the daemon pays only once it
    # verifies something (as HostMachine.trusted_certificates).
    from relaunchd.formats import authenticode

    signatures = authenticode.read_signatures(fd, headers)
    sinks = authenticode.digest_sinks(headers, {s.digest_algorithm for s in signatures})
    feed = [*sinks.values(), hashing.Sink(kernel_hash, [(0, length)])]
    try:
        hashing.feed(fd, feed, progress=(lambda d, t: progress("verifying", d, t))
                     if progress else None)
    except OSError as exc:
        raise InvalidImage(f"read failed while hashing the kernel: {exc}") from None
    digests = {alg: sink.hasher.digest() for alg, sink in sinks.items()}
    return authenticode.verify(signatures, digests, preload.certificates())


def _unsigned(reason: str) -> SignatureReport:
    return SignatureReport(signed=False, signers=[], digest_ok=[], verified=False,
                           verified_by=None, reasons=[reason])
