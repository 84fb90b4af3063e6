"""The image catalogue (engine layer): what can be staged, and a full report of one image.

`ListImages` lists, each item marked by `kind`:
- `image`: the UKIs in the configured image directories (and their EFI/Linux, where boot
  loaders keep type #2 entries), cheaply: headers and small sections only;
- `boot-loader`: one item, what the boot loader would do — its partitions, the entry it
  boots next and why, the default, notes (platform.boot_entries' Listing without entries);
- `boot-entry`: every boot loader entry (Type #1 and Type #2), in the loader's order, the
  ones it would not show last, each with the default/next-boot flags, what relaunchd
  refuses about it and whether its kernel verifies against the configured trust (that
  verdict hashes each kernel: one read of each file).
`Inspect` is the full report `relaunchctl inspect --json` prints; the bus adapter
authorizes the caller, since it reads any path root can read.
"""

from __future__ import annotations

from typing import Any

from relaunchd.engine.config import Config
from relaunchd.engine.machine import Machine
from relaunchd.errors import RelaunchError
from relaunchd.platform.image_files import ImagePolicy

IMAGE = "image"
BOOT_LOADER = "boot-loader"
BOOT_ENTRY = "boot-entry"


class Catalogue:
    def __init__(self, config: Config, machine: Machine) -> None:
        self.config = config
        self.machine = machine

    def list_images(self, staged_path: str | None = None) -> list[dict]:
        """Each image's catalogue entry, `staged` true for the one at `staged_path`."""
        policy = ImagePolicy(tuple(self.config.image_dirs))
        images = [{"kind": IMAGE, **self.machine.describe_image(path, policy),
                   "staged": path == staged_path}
                  for path in self.machine.find_images(self.config.image_dirs)]
        return images + self.boot_entries()

    def boot_entries(self) -> list[dict[str, Any]]:
        """The boot-loader item, then one boot-entry item per entry. A listing that
        cannot be made at all (a configured ESP that is not there) is the boot-loader
        item's `error`, not a failure of the whole catalogue."""
        where = self.config.boot_entries
        try:
            listing = self.machine.boot_entries(esp=where.esp, xbootldr=where.xbootldr,
                                                trusted=self._trusted())
        except RelaunchError as exc:
            return [{"kind": BOOT_LOADER, "error": f"{exc.name}: {exc}"}]
        summary = listing.to_json()
        entries = summary.pop("entries")
        return [{"kind": BOOT_LOADER, **summary},
                *({"kind": BOOT_ENTRY, **entry} for entry in entries)]

    def inspect(self, path: str, profile: int | None = None) -> dict:
        return self.machine.inspect_image(path, profile=profile,
                                          banks=self.config.measurement.banks,
                                          trusted=self._trusted())

    def _trusted(self) -> list:
        paths = self.config.trust.certificates
        return self.machine.trusted_certificates(paths) if paths else []
