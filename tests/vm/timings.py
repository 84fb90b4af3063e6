"""Timing figures of the VM tier: printed at the end of the run and appended to
`$RELAUNCHD_CACHE/vm/timings.json`, so later relaunch work can be compared with
these baselines (same guest, same TCG machine)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from support.ukibuild import cache_dir

KEEP = 100  # runs kept in the JSON file

LABELS = {
    "image_build": "guest image build (cold cache only)",
    "boot_to_ready": "QEMU start → systemd ready (first boot, incl. dpkg -i)",
    "kexec_to_ready": "systemctl kexec → systemd ready (Debian kexec-tools)",
    "kexec_shutdown": "  kexec: request → old kernel's last line (systemd shutdown)",
    "kexec_handover": "  kexec: → new kernel's console (purgatory, decompression)",
    "kexec_boot": "  kexec: → ready (kernel + userspace)",
    "reboot_to_ready": "systemctl reboot → SeaBIOS → systemd ready",
    "reboot_shutdown": "  reboot: request → old kernel's last line (systemd shutdown)",
    "reboot_handover": "  reboot: → new kernel's console (SeaBIOS, kernel load)",
    "reboot_boot": "  reboot: → ready (kernel + userspace)",
    "uefi_boot_to_ready": "QEMU start → OVMF → systemd-boot → UKI → ready",
}


@dataclass
class Timings:
    figures: dict[str, float] = field(default_factory=dict)
    guest: dict[str, str] = field(default_factory=dict)  # e.g. systemd-analyze per boot

    def add(self, name: str, seconds: float) -> None:
        self.figures[name] = round(seconds, 2)

    def table(self) -> str:
        width = max((len(LABELS.get(k, k)) for k in self.figures), default=0)
        lines = [f"  {LABELS.get(k, k):<{width}}  {v:7.1f} s" for k, v in self.figures.items()]
        lines += [f"  guest {k}: {v}" for k, v in self.guest.items()]
        return "\n".join(lines)

    def save(self, image_key: str) -> Path:
        path = cache_dir() / "vm" / "timings.json"
        try:
            runs = json.loads(path.read_text())
        except (OSError, ValueError):
            runs = []
        runs.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "image": image_key, "host": platform.node(), "cpus": os.cpu_count(),
                     "accel": "tcg", **asdict(self)})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs[-KEEP:], indent=1) + "\n")
        tmp.replace(path)
        return path
