"""What every launch method provides (launch layer): one small interface, one module per
method (`kexec`, `txt`, `skinit`), as RAUC's boot-loader backends share one contract.

- `verdict`: is this machine ready for the method, and if not, why (checks with stable ids);
- `segment_inputs`: what the segment loader needs to build this method's launch (the DCE,
  the DL handler, INTEL_INFO, ...), refusing up front what cannot work;
- `drtm`: whether the launch is a dynamic one (the TPM's DRTM PCRs 17–22 are reset and the
  next boot's proof checks the DRTM event log), and `default_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relaunchd.launch.checks import Verdict
    from relaunchd.launch.segment_loader import SegmentInputs
    from relaunchd.platform.readiness import PlatformFacts, ProbeConfig
    from relaunchd.platform.sysroot import SysRoot


@dataclass(frozen=True)
class LaunchRequest:
    """What a method may read to build its launch: the platform root, the configured places
    to look (`probe_config`: ACM directories, the DL handler), and explicit files (platform
    paths under `root`) that override what the probe would pick."""

    root: SysRoot
    probe_config: ProbeConfig
    sinit_acm: str | None = None
    dl_handler: str | None = None
    require_drtm: bool = False       # launch.require_drtm: the DL handler resets, not returns


class LaunchMethod(Protocol):
    name: str
    drtm: bool
    default_loader: str          # "file" (kexec_file_load) | "segments" (kexec_load)

    def verdict(self, facts: PlatformFacts) -> Verdict: ...

    def segment_inputs(self, request: LaunchRequest) -> SegmentInputs: ...
