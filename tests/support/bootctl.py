"""bootctl 252 as the oracle for boot entry order and the loader.conf default.

Debian 12 ships bootctl in the `systemd-boot` package, whose postinst installs
systemd-boot into the host's ESP when it finds one: not something to apt-install on a
developer or CI machine. So the package of the installed systemd's exact version is
fetched with `apt-get download`, unpacked into the cache (keyed by version), and its
`bootctl` runs against the installed libsystemd-shared.

bootctl insists that `--esp-path` is the root of a file system: each tree is copied
into a tmpfs mounted in a private mount namespace (`unshare -m`, nothing leaks to the
host) and listed with `--root`, which also keeps the host's EFI variables out of it
(`boot_config_select_special_entries(skip_efivars = !!arg_root)`): its default is
loader.conf's `default` or the first entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import ukibuild


def _installed_systemd_version() -> str:
    return ukibuild.run(["dpkg-query", "-W", "-f=${Version}", "libsystemd-shared"]).stdout


def bootctl_binary() -> Path:
    """bootctl of the installed systemd version, from the cache or downloaded once."""
    version = _installed_systemd_version()
    root = ukibuild.cache_dir() / "bootctl" / version
    binary = root / "usr" / "bin" / "bootctl"
    if (root / ".complete").exists():
        return binary
    with tempfile.TemporaryDirectory(dir=ukibuild.cache_dir()) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user must be able to write here
        ukibuild.run(["apt-get", "download", "-q", f"systemd-boot={version}"], cwd=tmp,
                     timeout=300)
        deb = next(Path(tmp).glob("systemd-boot_*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        ukibuild.run(["dpkg-deb", "-x", str(deb), str(root)])
    (root / ".complete").touch()
    return binary


@dataclass(frozen=True)
class BootctlListing:
    entries: list[dict]          # `bootctl list --json=short`, in bootctl's order
    default: str | None          # the id bootctl marks "(default)"


def bootctl_list(esp: Path, xbootldr: Path | None = None) -> BootctlListing:
    """`bootctl list` of the trees `esp` (and `xbootldr`), each copied onto a tmpfs."""
    binary = bootctl_binary()
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp)
        (mnt / "efi").mkdir()
        mounts = [f"mount -t tmpfs tmpfs {mnt}/efi", f"cp -a {esp}/. {mnt}/efi/"]
        args = ["--root", str(mnt), "--esp-path=/efi", "--no-pager"]
        if xbootldr is not None:
            (mnt / "boot").mkdir()
            mounts += [f"mount -t tmpfs tmpfs {mnt}/boot", f"cp -a {xbootldr}/. {mnt}/boot/"]
            args.append("--boot-path=/boot")
        cmd = " ".join(args)
        script = " && ".join([*mounts, f"{binary} {cmd} list --json=short",
                              "echo '----'", f"{binary} {cmd} list"])
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0",
               "SYSTEMD_LOG_LEVEL": "err", "SYSTEMD_RELAX_ESP_CHECKS": "1",
               "SYSTEMD_RELAX_XBOOTLDR_CHECKS": "1"}
        proc = subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True,
                              text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"bootctl list failed ({proc.returncode}):\n{proc.stderr}")
    json_part, text = proc.stdout.split("----\n", 1)
    entries = [json.loads(line) for line in json_part.splitlines() if line.strip()]
    return BootctlListing(entries, _default_of(text))


def _default_of(text: str) -> str | None:
    """The id under the title line marked "(default)" in bootctl's text listing."""
    marked = False
    for line in text.splitlines():
        if re.match(r"\s*title: .*\(default\)", line):
            marked = True
        elif marked and (m := re.match(r"\s*id: (.*)$", line)):
            return m.group(1)
    return None
