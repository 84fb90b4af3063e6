"""Sealed volumes: which of /etc/crypttab's TPM-sealed volumes unlock after a relaunch
(platform layer: reads crypttab, LUKS2 headers, PCRs, and what measures into them).

What a kexec relaunch does to the PCRs up to a volume's unlock in the new boot:

- the old system on its way down: systemd 252's systemd-pcrphase.service extends
  "shutdown" into PCR 11 when it stops, systemd-pcrphase-sysinit.service "final"
  after it (ExecStop; units/systemd-pcrphase*.service.in, src/boot/pcrphase.c: the
  word without NUL, every bank with PCR 11 allocated). Those units run only if the
  boot went through systemd-stub, which sets the StubPcrKernelImage EFI variable
  (ConditionPathExists= on it, and pcrphase itself checks it). On Debian 12 booted
  the usual way (GRUB + vmlinuz) there is no such variable: pcrphase is inactive
  and PCR 11 stays as the firmware left it. The variable is volatile but survives
  a kexec (EFI runtime variables are not reset), so a UKI-booted system keeps
  extending PCR 11 in every relaunched boot.
- relaunchd itself extends its measurement PCR (measurement.pcr, default 23) with
  the staged kernel, initrd and command line before the hand-off.
- the new boot before the unlock: for a volume the initrd attaches
  (x-initrd.attach), systemd-pcrphase-initrd's "enter-initrd" if that initrd runs
  systemd (the unit orders itself Before=cryptsetup-pre.target); nothing for the
  main system's volumes, which attach before sysinit.target, ahead of
  systemd-pcrphase-sysinit (After=sysinit.target). No firmware, boot loader or
  stub runs, so PCRs 0-10, 12-16 keep the old boot's values.
- a DRTM relaunch (txt/skinit) also resets and measures PCRs 17-22.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relaunchd.errors import InvalidVolume, RelaunchError
from relaunchd.formats import crypttab, luks_tokens, unlock_prediction
from relaunchd.formats.pcr11 import PcrSigEntry
from relaunchd.formats.tpm_policy import HASH_SIZES
from relaunchd.formats.unlock_prediction import Extend, RelaunchModel
from relaunchd.platform import luks_device, pcr_values
from relaunchd.platform.sysroot import SysRoot

CRYPTTAB = "/etc/crypttab"
CRYPTTAB_LIMIT = 256 << 10
STUB_PCR_VARIABLE = ("/sys/firmware/efi/efivars/"
                     "StubPcrKernelImage-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
PCRPHASE_UNITS = ("/lib/systemd/system/systemd-pcrphase.service",
                  "/usr/lib/systemd/system/systemd-pcrphase.service")
PCR_KERNEL_IMAGE = 11
SHUTDOWN_WORDS = ("shutdown", "final")
INITRD_WORDS = ("enter-initrd",)
DRTM_METHODS = ("txt", "skinit")


@dataclass(frozen=True)
class Context:
    """What the prediction needs beyond the volumes themselves."""

    tcti: str | None = None
    measurement_pcr: int | None = 23      # None: relaunchd does not measure
    method: str = "kexec"
    pcrsig: Sequence[PcrSigEntry] | None = None   # the staged image's `.pcrsig`


def image_pcrsig(path: str) -> list[PcrSigEntry]:
    """The `.pcrsig` entries of the UKI a relaunch would boot (none: an empty list)."""
    from relaunchd.formats import pcr11, uki

    with uki.open_image(path) as image:
        resolved = image.resolve()
        section = resolved.sections.get(".pcrsig")
        if section is None:
            return []
        try:
            return pcr11.parse_pcrsig(image.read_section(section))
        except pcr11.PcrSigError as exc:
            raise InvalidVolume(f"{path}: {exc}") from None


def pcrphase_active(root: SysRoot) -> bool:
    """Does systemd-pcrphase measure in this boot (and so in the relaunched ones)?"""
    return root.exists(STUB_PCR_VARIABLE) and any(root.exists(u) for u in PCRPHASE_UNITS)


def model_for(root: SysRoot, entry: crypttab.CrypttabEntry, context: Context,
              banks: Sequence[str]) -> RelaunchModel:
    extends: dict[int, list[Extend]] = {}
    if pcrphase_active(root):
        words = SHUTDOWN_WORDS + (INITRD_WORDS if entry.in_initrd else ())
        extends[PCR_KERNEL_IMAGE] = [
            Extend(label=f"systemd-pcrphase measures {word!r}"
                   + (" in the new boot's initrd" if word in INITRD_WORDS
                      else " as the old system goes down"),
                   digests={b: hashlib.new(b, word.encode()).digest() for b in banks})
            for word in words]
    if context.measurement_pcr is not None:
        extends.setdefault(context.measurement_pcr, []).append(Extend(
            label="relaunchd measures the staged kernel, initrd and command line"))
    resets = unlock_prediction.DRTM_RESET_PCRS if context.method in DRTM_METHODS else frozenset()
    return RelaunchModel(extends=extends, resets=resets, pcrsig=context.pcrsig,
                         describe="DRTM relaunch" if resets else "kexec relaunch")


def report(root: SysRoot, context: Context | None = None) -> list[dict[str, Any]]:
    """One entry per /etc/crypttab volume with a TPM-sealed token:
    {"name", "device", "pcrs", "unlocks_after_relaunch", "stale_pcrs", "reason", "remedy",
     "tokens": [...]}; volumes that cannot be read say why (and do not count as unlocking)."""
    context = context or Context()
    text = root.read_text(CRYPTTAB, limit=CRYPTTAB_LIMIT)
    if not text.ok or text.value is None:
        if text.error == "not-present":
            return []
        raise InvalidVolume(f"{CRYPTTAB}: {text.error} ({text.detail})")
    volumes = []
    for entry in crypttab.parse(text.value):
        volume = _volume(root, entry, context)
        if volume is not None:
            volumes.append(volume)
    return volumes


def report_or_problem(root: SysRoot, context: Context | None = None,
                      image: str | None = None) -> list[dict[str, Any]]:
    """`report`, with `image`'s `.pcrsig` in the context; a problem with /etc/crypttab
    or the image is one entry saying so (with `error`), never an exception."""
    try:
        if image is not None:
            context = dataclasses.replace(context or Context(), pcrsig=image_pcrsig(image))
        return report(root, context)
    except RelaunchError as exc:
        return [{"name": None, "device": None, "pcrs": [], "unlocks_after_relaunch": False,
                 "stale_pcrs": [], "reason": f"{exc.name}: {exc}", "remedy": None,
                 "error": str(exc)}]


def summary(volume: dict[str, Any]) -> dict[str, Any]:
    """A volume's verdict without its per-token detail (for Capabilities)."""
    keys = ("name", "device", "pcrs", "unlocks_after_relaunch", "stale_pcrs", "reason",
            "remedy", "error")
    return {k: volume[k] for k in keys if k in volume}


def _volume(root: SysRoot, entry: crypttab.CrypttabEntry,
            context: Context) -> dict[str, Any] | None:
    base: dict[str, Any] = {"name": entry.name, "device": entry.device, "pcrs": [],
                            "unlocks_after_relaunch": False, "stale_pcrs": []}
    try:
        header, node = luks_device.read_header(root.root, entry.device_node)
        sealings = luks_tokens.tpm_sealings(header)
    except luks_device.DeviceNotOpened as exc:
        return {**base, "reason": f"cannot open {exc}",
                "remedy": "check the device in /etc/crypttab", "error": str(exc)}
    except InvalidVolume as exc:
        if "no LUKS header" in str(exc) or "not LUKS2" in str(exc):
            return None                 # plain dm-crypt, LUKS1: nothing sealed to the TPM
        return {**base, "reason": f"cannot read its LUKS2 header: {exc}",
                "remedy": "check the device and header (cryptsetup luksDump)", "error": str(exc)}
    except OSError as exc:
        return {**base, "reason": f"cannot open {entry.device_node}: {exc.strerror or exc}",
                "remedy": "check the device in /etc/crypttab", "error": str(exc)}
    if not sealings:
        return None
    banks = sorted({s.bank for s in sealings})
    model = model_for(root, entry, context, list(HASH_SIZES))
    tokens = []
    for sealing in sealings:
        watched = sorted(set(sealing.pcrs) | set(sealing.pubkey_pcrs))
        current = pcr_values.read(root, sealing.bank, watched, context.tcti)
        if current.missing:
            tokens.append({"token": sealing.token_id, "source": sealing.source,
                           "bank": sealing.bank, "pcrs": list(sealing.pcrs),
                           "unlocks_after_relaunch": False,
                           "reason": "cannot read PCR(s): " + "; ".join(
                               f"{p}: {why}" for p, why in sorted(current.missing.items())),
                           "remedy": "make the TPM's PCRs readable (tpm2-pytss, or Linux 5.12+ "
                                     "sysfs pcr-<bank>/ files)"})
            continue
        try:
            verdict = unlock_prediction.assess(sealing, {sealing.bank: current.values}, model)
        except RelaunchError as exc:
            tokens.append({"token": sealing.token_id, "source": sealing.source,
                           "bank": sealing.bank, "pcrs": list(sealing.pcrs),
                           "unlocks_after_relaunch": False, "reason": str(exc),
                           "remedy": None, "error": str(exc)})
            continue
        tokens.append({"token": verdict.token_id, "source": verdict.source,
                       "keyslots": list(sealing.keyslots), "bank": verdict.bank,
                       "pcrs": list(verdict.pcrs), "pubkey_pcrs": list(verdict.pubkey_pcrs),
                       "pin": sealing.pin, "holds_now": verdict.matches_now,
                       "unlocks_after_relaunch": verdict.unlocks_after_relaunch,
                       "stale_pcrs": list(verdict.stale_pcrs), "reason": verdict.reason,
                       "remedy": verdict.remedy, "pcr_source": current.source})
    unlocking = [t for t in tokens if t["unlocks_after_relaunch"]]
    chosen = min(unlocking, key=lambda t: len(t["stale_pcrs"])) if unlocking else tokens[0]
    return {"name": entry.name, "device": entry.device, "device_node": node,
            "in_initrd": entry.in_initrd, "banks": banks,
            "pcrs": sorted({p for t in tokens for p in t["pcrs"] + t.get("pubkey_pcrs", [])}),
            "unlocks_after_relaunch": bool(unlocking),
            "stale_pcrs": chosen.get("stale_pcrs", []),
            "reason": chosen["reason"], "remedy": chosen.get("remedy"),
            "tokens": tokens}
