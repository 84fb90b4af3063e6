"""Where the readiness probe looks (platform layer; no imports, so the configuration can
name its defaults without loading the probe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeConfig:
    """Where to look. Paths are platform paths, resolved under `root`."""

    root: str = "/"
    acm_dirs: tuple[str, ...] = ("/boot", "/lib/firmware/intel-txt", "/usr/lib/relaunchd/acm")
    dl_handler: str = "/usr/lib/relaunchd/txt-dl-handler.bin"
    skl: str = "/usr/lib/relaunchd/skl.bin"
    tpm_tcti: str | None = None       # None: the kernel resource manager on the real root only
