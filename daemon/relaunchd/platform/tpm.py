"""TPM facts (platform layer): what the kernel shows in sysfs, and DRTM PCRs via tpm2-pytss.

Sources (drtm.md §3.4, ecosystem.md §6): `/sys/class/tpm/tpmN/tpm_version_major`,
the `device/driver` link (tpm_tis = FIFO/TIS, tpm_crb = CRB; Secure Launch
v16's early TPM driver refuses CRB), `pcr-<bank>/` directories (one per
allocated bank, Linux 5.12+), the event logs in securityfs and /run.

PCRs 17 and 18 read all ones from TPM reset until a dynamic launch resets them
to zero and extends them (drtm.md §3.4, §4.1): the cheapest "did a DRTM happen
this boot?" test. tpm2-pytss is imported only when a TPM is actually asked,
so `relaunchctl check` stays fast where there is none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from relaunchd.platform.sysroot import GARBAGE, NOT_PRESENT, UNREADABLE, Read, SysRoot

CLASS_DIR = "/sys/class/tpm"
FIRMWARE_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
DRTM_LOG = "/sys/kernel/security/slaunch/eventlog"
SYSTEMD_LOG = "/run/log/systemd/tpm2-measure.log"
DEVICE_RM = "/dev/tpmrm0"
DRTM_LAUNCH_PCRS = (17, 18)
BANK_PREFERENCE = ("sha256", "sha384", "sha512", "sha1")


@dataclass(frozen=True)
class DrtmPcrs:
    bank: str
    values: dict[int, str]         # PCR index -> hex digest
    reset_state: bool              # all of them still all-ones: no dynamic launch since reset


def interface_of(driver: str) -> str:
    """tis / crb / other, from the kernel driver name (drtm.md §3.4)."""
    if driver.startswith("tpm_tis"):
        return "tis"            # tpm_tis, tpm_tis_spi, tpm_tis_i2c: all FIFO interface
    if driver == "tpm_crb":
        return "crb"
    return "other"


def sysfs_facts(root: SysRoot) -> dict[str, Read]:
    """TPM facts from sysfs/securityfs/run, each with the path it came from."""
    facts: dict[str, Read] = {}
    devices = root.listdir(CLASS_DIR)
    chips = [d for d in devices.value or [] if d.startswith("tpm") and d[3:].isdigit()]
    if not devices.ok and devices.error != NOT_PRESENT:
        facts["tpm.present"] = Read(CLASS_DIR, error=devices.error, detail=devices.detail)
        return facts
    facts["tpm.present"] = Read(CLASS_DIR, bool(chips))
    if not chips:
        return facts
    chip = f"{CLASS_DIR}/{min(chips, key=lambda c: int(c[3:]))}"
    facts["tpm.device"] = Read(chip, os.path.basename(chip))
    facts["tpm.version"] = _version(root, chip)
    link = root.readlink(f"{chip}/device/driver")
    if link.ok and link.value is not None:
        driver = os.path.basename(link.value.rstrip("/"))
        facts["tpm.driver"] = Read(link.path, driver)
        facts["tpm.interface"] = Read(link.path, interface_of(driver))
    else:
        facts["tpm.driver"] = link
        facts["tpm.interface"] = Read(link.path, error=link.error, detail=link.detail)
    entries = root.listdir(chip)
    if entries.ok and entries.value is not None:
        banks = sorted(e[4:] for e in entries.value if e.startswith("pcr-"))
        facts["tpm.banks"] = (Read(chip, banks) if banks else
                              Read(f"{chip}/pcr-*", error=NOT_PRESENT,
                                   detail="no pcr-<bank> directories (Linux < 5.12?)"))
    locality = root.read_int(f"{chip}/locality")
    if locality.ok or locality.error != NOT_PRESENT:
        facts["tpm.locality"] = locality   # v16 Secure Launch only (drtm.md §2.2)
    facts["tpm.eventlog.firmware"] = _exists(root, FIRMWARE_LOG)
    facts["tpm.eventlog.drtm"] = _exists(root, DRTM_LOG)
    facts["tpm.eventlog.systemd"] = _exists(root, SYSTEMD_LOG)
    return facts


def _version(root: SysRoot, chip: str) -> Read[int]:
    major = root.read_int(f"{chip}/tpm_version_major")
    if major.ok and major.value in (1, 2):
        return major
    if major.ok:
        return Read(major.path, error=GARBAGE, detail=f"unknown TPM version {major.value}")
    # Older kernels: TPM 1.2 chips expose `caps`, TPM 2.0 chips get a resource manager.
    if root.exists(f"{chip}/device/caps") or root.exists(f"{chip}/caps"):
        return Read(f"{chip}/device/caps", 1)
    if root.exists(DEVICE_RM):
        return Read(DEVICE_RM, 2)
    return Read(major.path, error=major.error, detail=major.detail)


def _exists(root: SysRoot, path: str) -> Read[bool]:
    # Existence only: the logs are root-only and can be large; parsing is the verifier's job.
    return Read(path, root.exists(path))


def default_tcti(root: SysRoot) -> str | None:
    """The kernel resource manager, only on the real root (a fixture has no TPM behind it)."""
    if root.root == "/" and root.exists(DEVICE_RM):
        return f"device:{DEVICE_RM}"
    return None


def import_pytss():
    """tpm2_pytss, imported lazily (~70 ms; most hosts have no TPM to ask) and
    made usable: Debian's 1.2.0 builds hollow objects (no _cdata) whenever
    unittest.mock was imported before it, a hack for its documentation build
    (internal/utils.py __MOCK__); any library importing unittest.mock
    (hypothesis does) would break every TPM call. Raises ImportError."""
    import tpm2_pytss
    from tpm2_pytss.internal import utils as pytss_utils

    if getattr(pytss_utils, "__MOCK__", False):
        pytss_utils.__MOCK__ = False
    return tpm2_pytss


def read_drtm_pcrs(tcti: str) -> Read[DrtmPcrs]:
    """PCRs 17/18 of the first allocated preferred bank, through tpm2-pytss."""
    source = f"tcti:{tcti}"
    try:
        pytss = import_pytss()
    except ImportError as exc:
        return Read(source, error=NOT_PRESENT, detail=f"tpm2-pytss not available: {exc}")
    ESAPI, TPML_PCR_SELECTION = pytss.ESAPI, pytss.TPML_PCR_SELECTION
    try:
        ectx = ESAPI(tcti)
    except Exception as exc:  # TSS2_Exception, or a TCTI load error; the TPM is just "unknown"
        return Read(source, error=UNREADABLE, detail=f"cannot open TPM: {exc}")
    try:
        # The first preferred bank that has 17 and 18 allocated: TPM2_PCR_Read simply
        # returns no digest for a PCR its bank does not hold (TPM 2.0 Part 3, §22.4).
        values: dict[int, str] = {}
        bank = ""
        for bank in BANK_PREFERENCE:
            spec = f"{bank}:{','.join(str(i) for i in DRTM_LAUNCH_PCRS)}"
            _counter, _sel, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse(spec))
            got = [bytes(d).hex() for d in digests]
            if len(got) == len(DRTM_LAUNCH_PCRS):
                values = dict(zip(DRTM_LAUNCH_PCRS, got, strict=True))
                break
        if not values:
            return Read(source, error=NOT_PRESENT,
                        detail=f"PCRs 17/18 not allocated in any of {BANK_PREFERENCE}")
    except Exception as exc:
        return Read(source, error=UNREADABLE, detail=f"TPM command failed: {exc}")
    finally:
        ectx.close()
    reset = all(set(v) == {"f"} for v in values.values())
    return Read(source, DrtmPcrs(bank, values, reset))
