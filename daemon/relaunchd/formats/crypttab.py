"""/etc/crypttab, as systemd 252 reads it (formats layer).

crypttab(5) (systemd 252, man/crypttab.xml): empty lines and lines starting with
"#" are ignored; each other line is `volume-name encrypted-device [key-file
[options]]`, fields separated by white space; the key file is absent when the
field is missing, "none" or "-"; options are comma-separated, `name` or
`name=value`. The device is a path or UUID= (systemd also resolves the other
fstab-style specifications, LABEL=, PARTUUID=, PARTLABEL=, through the udev
links below /dev/disk/ — src/shared/fstab-util.c, fstab_node_to_udev_node: the
value unquoted, case kept, and escaped as udev names links, encode_devnode_name in
src/shared/device-nodes.c: bytes other than ASCII alphanumerics, "#+-.:=@_" and
valid UTF-8 become \\xNN).
"""

from __future__ import annotations

from dataclasses import dataclass

from relaunchd.errors import InvalidVolume

# fstab_node_to_udev_node: tag -> /dev/disk/ directory.
DEVICE_TAGS = {"UUID": "by-uuid", "LABEL": "by-label", "PARTUUID": "by-partuuid",
               "PARTLABEL": "by-partlabel"}


@dataclass(frozen=True)
class CrypttabEntry:
    name: str
    device: str                      # as written: a path or TAG=value
    key_file: str | None
    options: tuple[str, ...]
    line: int

    def option(self, name: str) -> str | bool | None:
        """The value of option `name` (True when given without a value; None when absent;
        the last one wins, as systemd parses them in order)."""
        found: str | bool | None = None
        for opt in self.options:
            key, eq, value = opt.partition("=")
            if key == name:
                found = value if eq else True
        return found

    @property
    def in_initrd(self) -> bool:
        """Unlocked in the initrd (before the main system's PCR phases)."""
        return self.option("x-initrd.attach") is not None

    @property
    def device_node(self) -> str:
        return device_node(self.device)


def device_node(spec: str) -> str:
    """The /dev path of a crypttab device field."""
    tag, eq, value = spec.partition("=")
    if eq and tag in DEVICE_TAGS:
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not value or value in (".", ".."):
            raise InvalidVolume(f"crypttab device {spec!r} is malformed")
        return f"/dev/disk/{DEVICE_TAGS[tag]}/{_udev_escape(value)}"
    if not spec.startswith("/"):
        raise InvalidVolume(f"crypttab device {spec!r} is neither an absolute path "
                            f"nor {'/'.join(t + '=' for t in DEVICE_TAGS)}")
    return spec


def _udev_escape(value: str) -> str:
    out = []
    for char in value:
        if (char.isascii() and char.isalnum()) or char in "#+-.:=@_" or not char.isascii():
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out)


def parse(text: str) -> list[CrypttabEntry]:
    entries: list[CrypttabEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if not 2 <= len(fields) <= 4:
            raise InvalidVolume(f"/etc/crypttab line {number}: {len(fields)} fields, "
                                "expected 2 to 4")
        name, device = fields[0], fields[1]
        if "/" in name or name in (".", ".."):
            raise InvalidVolume(f"/etc/crypttab line {number}: bad volume name {name!r}")
        key = fields[2] if len(fields) > 2 else None
        options = tuple(o for o in fields[3].split(",") if o) if len(fields) > 3 else ()
        entries.append(CrypttabEntry(name=name, device=device,
                                     key_file=None if key in (None, "-", "none") else key,
                                     options=options, line=number))
    return entries
