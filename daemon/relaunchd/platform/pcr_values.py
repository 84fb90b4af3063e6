"""Current PCR values of one bank (platform layer).

From the TPM through tpm2-pytss (TPM2_PCR_Read, TPM 2.0 Part 3 §22.4) when there
is one to ask, or from what the kernel exposes, one file per PCR:
/sys/class/tpm/tpm0/pcr-<bank>/<n>, the value in hex (Linux 5.12+,
drivers/char/tpm/tpm-sysfs.c pcr_value_show). Under `--root` only the latter:
a fixture tree has no TPM behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relaunchd.formats.tpm_policy import HASH_SIZES
from relaunchd.platform import tpm
from relaunchd.platform.sysroot import SysRoot

SYSFS_BANK = "/sys/class/tpm/tpm0/pcr-{bank}/{pcr}"
PCR_READ_MAX = 8            # TPM2_PCR_Read returns at most 8 digests per call (pcrSelect)


@dataclass(frozen=True)
class PcrValues:
    bank: str
    values: dict[int, bytes]
    source: str               # "tcti:<tcti>" or the sysfs directory
    missing: dict[int, str]   # PCR -> why it could not be read


def read(root: SysRoot, bank: str, pcrs: Sequence[int], tcti: str | None = None) -> PcrValues:
    """Values of `pcrs` in `bank`: from the TPM when `tcti` is given or the root is the
    real one with a TPM, else (or when the TPM cannot be asked) from sysfs."""
    wanted = sorted(set(pcrs))
    tcti = tcti or tpm.default_tcti(root)
    if tcti:
        got = _from_tpm(tcti, bank, wanted)
        if got is not None:
            return got
    return _from_sysfs(root, bank, wanted)


def _from_tpm(tcti: str, bank: str, pcrs: list[int]) -> PcrValues | None:
    try:
        pytss = tpm.import_pytss()
    except ImportError:
        return None
    try:
        ectx = pytss.ESAPI(tcti)
    except Exception:   # TCTI load/connect errors are several classes; fall back to sysfs
        return None
    values: dict[int, bytes] = {}
    missing: dict[int, str] = {}
    try:
        for start in range(0, len(pcrs), PCR_READ_MAX):
            chunk = pcrs[start:start + PCR_READ_MAX]
            spec = f"{bank}:{','.join(str(p) for p in chunk)}"
            _counter, selection, digests = ectx.pcr_read(pytss.TPML_PCR_SELECTION.parse(spec))
            got = [bytes(d) for d in digests]
            # The TPM returns what it read, ascending; a bank it does not hold gives none.
            read_pcrs = _selected(selection, bank)
            for pcr, value in zip(read_pcrs, got, strict=False):
                values[pcr] = value
        for pcr in pcrs:
            if pcr not in values:
                missing[pcr] = f"the TPM has no {bank} bank for PCR {pcr}"
    except Exception as exc:  # TSS2_Exception: report per PCR, as sysfs does
        return PcrValues(bank, values, f"tcti:{tcti}",
                         {p: f"TPM2_PCR_Read failed: {exc}" for p in pcrs if p not in values})
    finally:
        ectx.close()
    return PcrValues(bank, values, f"tcti:{tcti}", missing)


def _selected(selection, bank: str) -> list[int]:
    """PCR numbers in a returned TPML_PCR_SELECTION for `bank`, ascending."""
    from relaunchd.formats.tpm_policy import HASH_ALG_IDS

    out: list[int] = []
    for sel in selection.pcrSelections[:selection.count]:
        if int(sel.hash) != HASH_ALG_IDS[bank]:
            continue
        bitmap = bytes(sel.pcrSelect)[:sel.sizeofSelect]
        out += [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return out


def _from_sysfs(root: SysRoot, bank: str, pcrs: list[int]) -> PcrValues:
    values: dict[int, bytes] = {}
    missing: dict[int, str] = {}
    for pcr in pcrs:
        path = SYSFS_BANK.format(bank=bank, pcr=pcr)
        line = root.read_line(path)
        if not line.ok or line.value is None:
            missing[pcr] = f"{path}: {line.error} ({line.detail})"
            continue
        try:
            value = bytes.fromhex(line.value)
        except ValueError:
            missing[pcr] = f"{path}: not hex"
            continue
        if len(value) != HASH_SIZES.get(bank, -1):
            missing[pcr] = f"{path}: {len(value)} bytes, not a {bank} digest"
            continue
        values[pcr] = value
    return PcrValues(bank, values, SYSFS_BANK.format(bank=bank, pcr="")[:-1], missing)
