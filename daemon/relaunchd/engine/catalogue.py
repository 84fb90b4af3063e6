"""The image catalogue (engine layer): what can be staged, and a full report of one image.

`ListImages` lists the UKIs in the configured image directories (and their EFI/Linux, where
boot loaders keep type #2 entries) cheaply: headers and small sections only. `Inspect` is
the full report `relaunchctl inspect --json` prints; the bus adapter authorizes the caller,
since it reads any path root can read.
"""

from __future__ import annotations

from relaunchd.engine.config import Config
from relaunchd.engine.machine import Machine
from relaunchd.platform.image_files import ImagePolicy


class Catalogue:
    def __init__(self, config: Config, machine: Machine) -> None:
        self.config = config
        self.machine = machine

    def list_images(self, staged_path: str | None = None) -> list[dict]:
        """Each image's catalogue entry, `staged` true for the one at `staged_path`."""
        policy = ImagePolicy(tuple(self.config.image_dirs))
        return [{**self.machine.describe_image(path, policy), "staged": path == staged_path}
                for path in self.machine.find_images(self.config.image_dirs)]

    def inspect(self, path: str, profile: int | None = None) -> dict:
        paths = self.config.trust.certificates
        trusted = self.machine.trusted_certificates(paths) if paths else []
        return self.machine.inspect_image(path, profile=profile,
                                          banks=self.config.measurement.banks,
                                          trusted=trusted)
