"""Build real UKIs for tests and the demo.

Inputs are real: Debian 12's systemd-stub (`systemd-boot-efi`) and a Debian 12
cloud kernel fetched with `apt-get download` and cached outside the repository
(keyed by package name and version). Sections are added with `objcopy` at
computed addresses (uki.md §6: start after the stub's last section, page-align
each payload, `.linux` last) and images are signed with `sbsign` using a test CA
generated with `openssl`.

This is test support, not product code: it shells out to the same tools a
distribution would use, so the images are what relaunchd meets in the field.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
PAGE = 4096


def cache_dir() -> Path:
    base = os.environ.get("RELAUNCHD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "relaunchd"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its stderr so a broken build is obvious."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# --------------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class DebianKernel:
    package: str
    version: str
    vmlinuz: Path
    config: Path

    @property
    def release(self) -> str:
        return self.package.removeprefix("linux-image-")


def _resolve_kernel_package() -> tuple[str, str]:
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    pkg = next(
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    )
    show = run(["apt-cache", "show", "--no-all-versions", pkg]).stdout
    version = next(
        line.split(":", 1)[1].strip() for line in show.splitlines() if line.startswith("Version:")
    )
    return pkg, version


def debian_kernel() -> DebianKernel:
    """The current Debian 12 cloud kernel, downloaded once and cached by package+version."""
    root = cache_dir() / "kernel"
    root.mkdir(exist_ok=True)
    try:
        pkg, version = _resolve_kernel_package()
    except (RuntimeError, StopIteration):
        # No apt metadata (offline): fall back to whatever is cached.
        cached = sorted(root.glob("linux-image-*/boot/vmlinuz-*"))
        if not cached:
            raise
        vmlinuz = cached[-1]
        pkg_dir = vmlinuz.parent.parent
        pkg, version = pkg_dir.name.rsplit("_", 1)
        return _kernel_from_dir(pkg, version, pkg_dir)
    pkg_dir = root / f"{pkg}_{version}"
    if not (pkg_dir / ".complete").exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user must be able to write here
            run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=tmp)
            deb = next(Path(tmp).glob("*.deb"))
            extract = Path(tmp) / "x"
            run(["dpkg-deb", "-x", str(deb), str(extract)])
            shutil.rmtree(pkg_dir, ignore_errors=True)
            pkg_dir.mkdir()
            shutil.move(str(extract / "boot"), str(pkg_dir / "boot"))
            shutil.move(str(deb), str(pkg_dir / deb.name))
        (pkg_dir / ".complete").touch()
    return _kernel_from_dir(pkg, version, pkg_dir)


def _kernel_from_dir(pkg: str, version: str, pkg_dir: Path) -> DebianKernel:
    release = pkg.removeprefix("linux-image-")
    return DebianKernel(
        package=pkg,
        version=version,
        vmlinuz=pkg_dir / "boot" / f"vmlinuz-{release}",
        config=pkg_dir / "boot" / f"config-{release}",
    )


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class SigningKey:
    key: Path
    cert: Path  # PEM
    subject: str


def make_signing_key(directory: Path, name: str, cn: str) -> SigningKey:
    """A self-signed RSA-2048 code-signing certificate, like a UEFI db entry."""
    key = directory / f"{name}.key"
    cert = directory / f"{name}.crt"
    if not cert.exists():
        run([
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
            "-days", "3650", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert),
        ])
    return SigningKey(key=key, cert=cert, subject=f"CN={cn}")


def sign(image: Path, key: SigningKey, output: Path) -> Path:
    run(["sbsign", "--key", str(key.key), "--cert", str(key.cert), "--output", str(output),
         str(image)])
    return output


def sbverify(image: Path, cert: Path) -> bool:
    """The independent oracle for signature verdicts."""
    proc = subprocess.run(["sbverify", "--cert", str(cert), str(image)],
                          capture_output=True, text=True)
    return proc.returncode == 0


# --------------------------------------------------------------------------- UKI


@dataclass
class UkiSpec:
    """Sections in file order: (name, content). Duplicate names are allowed
    (multi-profile UKIs); objcopy cannot add them, so they are added under
    placeholder names and renamed in the section table afterwards."""

    sections: list[tuple[str, bytes | Path]] = field(default_factory=list)
    stub: Path = STUB
    stub_version: str | None = None  # rewrite .sdmagic to claim another stub version


def _stub_end(stub: Path) -> int:
    out = run(["objdump", "-h", str(stub)]).stdout
    end = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            end = max(end, int(parts[3], 16) + int(parts[2], 16))
    return end


def build_uki(spec: UkiSpec, output: Path) -> Path:
    """objcopy the given sections onto the stub at computed, page-aligned VMAs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        offset = (_stub_end(spec.stub) + PAGE - 1) // PAGE * PAGE
        args: list[str] = []
        renames: list[tuple[str, str]] = []
        empty: set[str] = set()  # placeholder names whose VirtualSize becomes 0 (masks)
        seen: set[str] = set(_stub_sections(spec.stub))
        for i, (name, content) in enumerate(spec.sections):
            if isinstance(content, Path):
                path, size = content, content.stat().st_size
            else:
                path = tmpd / f"s{i}"
                # objcopy drops empty sections: add one byte, then zero VirtualSize
                path.write_bytes(content or b"\0")
                size = len(content)
            use = name
            if name in seen or size == 0:
                use = f".r{i:05d}"[:8]
                renames.append((use, name))
                if size == 0:
                    empty.add(use)
            seen.add(name)
            args += ["--add-section", f"{use}={path}",
                     "--change-section-vma", f"{use}=0x{offset:x}"]
            offset = (offset + max(size, 1) + PAGE - 1) // PAGE * PAGE
        run(["objcopy", "--strip-all", *args, str(spec.stub), str(output)])
        if renames or spec.stub_version:
            _patch(output, renames, empty, spec.stub_version)
    return output


def _stub_sections(stub: Path) -> list[str]:
    out = run(["objdump", "-h", str(stub)]).stdout
    return [p[1] for p in (line.split() for line in out.splitlines())
            if len(p) >= 4 and p[0].isdigit()]


def _patch(image: Path, renames: list[tuple[str, str]], empty: set[str],
           stub_version: str | None) -> None:
    data = bytearray(image.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    nsec = struct.unpack_from("<H", data, pe + 6)[0]
    opt_size = struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + opt_size
    names = dict(renames)
    for i in range(nsec):
        hdr = table + 40 * i
        raw_name = bytes(data[hdr:hdr + 8]).rstrip(b"\0").decode()
        if raw_name in names:
            data[hdr:hdr + 8] = names[raw_name].encode().ljust(8, b"\0")
        if raw_name in empty:
            struct.pack_into("<I", data, hdr + 8, 0)
        if raw_name == ".sdmagic" and stub_version:
            vsize, _va, _rsize, ptr = struct.unpack_from("<IIII", data, hdr + 8)
            text = f"#### LoaderInfo: systemd-stub {stub_version} ####".encode()
            text = text[:vsize].ljust(vsize, b"\0")
            data[ptr:ptr + vsize] = text
    image.write_bytes(bytes(data))


def newc_cpio(files: dict[str, bytes]) -> bytes:
    """A small newc archive made by GNU cpio itself (an independent producer)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            p = Path(tmp) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
            if content.startswith(b"#!"):
                p.chmod(0o755)
        listing = "\n".join(sorted(files)) + "\n"
        proc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=listing.encode(),
                              capture_output=True, cwd=tmp, check=True)
        return proc.stdout


def systemd_measure(sections: dict[str, Path], banks: list[str],
                    phases: list[str] | None = None) -> dict[str, dict[str, str]]:
    """`systemd-measure calculate` on extracted section files → {phase: {bank: hex}}.

    Without `phases` the tool uses its four default phase paths; the phase
    path ":" means "after the sections, no phase word" (uki.md §2.1)."""
    cmd = ["/usr/lib/systemd/systemd-measure", "calculate", "--json=short"]
    for name, path in sections.items():
        cmd.append(f"--{name.lstrip('.')}={path}")
    cmd += [f"--bank={bank}" for bank in banks]
    cmd += [f"--phase={phase}" for phase in phases or []]
    result: dict[str, dict[str, str]] = {}
    for bank, entries in json.loads(run(cmd).stdout).items():
        for entry in entries:
            phase = entry.get("phase", "")
            phase = "" if phase == ":" else phase
            result.setdefault(phase, {})[bank.lower()] = entry["hash"].lower()
    return result


# --------------------------------------------------------------------------- test set


def bmp_image(width: int = 4, height: int = 2) -> bytes:
    """A tiny valid 24-bit BMP, for `.splash`."""
    row = (b"\x20\x40\x80" * width).ljust((width * 3 + 3) // 4 * 4, b"\0")
    pixels = row * height
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def fdt_blob() -> bytes:
    """A minimal valid flattened device tree (empty root node), for `.dtb`."""
    struct_block = struct.pack(">II4sII", 1, 0, b"\0\0\0\0", 2, 9)  # BEGIN_NODE "" END_NODE END
    off_struct = 40 + 16
    total = off_struct + len(struct_block)
    header = struct.pack(">10I", 0xD00DFEED, total, off_struct, total, 40, 17, 16, 0, 0,
                         len(struct_block))
    return header + bytes(16) + struct_block


def pcr_keypair(directory: Path) -> tuple[Path, Path]:
    private = directory / "pcr-private.pem"
    public = directory / "pcr-public.pem"
    if not public.exists():
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(private)])
        run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)])
    return private, public


def systemd_measure_sign(sections: dict[str, Path], private: Path, public: Path,
                         banks: list[str], phases: list[str]) -> bytes:
    """A real `.pcrsig`: `systemd-measure sign` (252 needs a TPM: swtpm provides it)."""
    from .swtpm import running_swtpm

    cmd = ["/usr/lib/systemd/systemd-measure", "sign", f"--private-key={private}",
           f"--public-key={public}"]
    cmd += [f"--{name.lstrip('.')}={path}" for name, path in sections.items()]
    cmd += [f"--bank={b}" for b in banks] + [f"--phase={p}" for p in phases]
    with running_swtpm() as tpm:
        cmd.append(f"--tpm2-device={tpm.tcti}")
        return run(cmd).stdout.strip().encode() + b"\0"


OS_RELEASE = (
    b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
    b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n'
)
CMDLINE = b"console=ttyS0 root=/dev/vda rw quiet relaunchd.test=full"
PHASES_252 = ["enter-initrd", "enter-initrd:leave-initrd",
              "enter-initrd:leave-initrd:sysinit", "enter-initrd:leave-initrd:sysinit:ready"]


def build_test_set(out: Path, kernel: DebianKernel, keys: dict[str, SigningKey]) -> dict[str, Path]:
    """Every UKI shape the test suite relies on, built from real inputs.

    `.sbat` comes from the stub itself (objcopy cannot grow it in place the
    way ukify merges it), so "full" carries every section a 252-era UKI has."""
    parts = out / "parts"
    parts.mkdir(exist_ok=True)

    def part(name: str, data: bytes) -> Path:
        path = parts / name
        path.write_bytes(data)
        return path

    osrel = part("os-release", OS_RELEASE)
    cmdline = part("cmdline", CMDLINE)
    uname = part("uname", kernel.release.encode())
    initrd = part("initrd.cpio", newc_cpio({"init": b"#!/bin/sh\necho relaunchd test\n",
                                             "etc/relaunchd-marker": b"full\n"}))
    splash = part("splash.bmp", bmp_image())
    dtb = part("test.dtb", fdt_blob())
    private, public = pcr_keypair(parts)
    measured_252 = {".linux": kernel.vmlinuz, ".osrel": osrel, ".cmdline": cmdline,
                    ".initrd": initrd, ".splash": splash, ".dtb": dtb, ".pcrpkey": public}
    pcrsig = part("pcrsig.json", systemd_measure_sign(
        measured_252, private, public, ["sha1", "sha256", "sha384", "sha512"], PHASES_252))

    full_sections: list[tuple[str, bytes | Path]] = [
        (".osrel", osrel), (".cmdline", cmdline), (".uname", uname), (".splash", splash),
        (".dtb", dtb), (".pcrpkey", public), (".pcrsig", pcrsig),
        (".initrd", initrd), (".linux", kernel.vmlinuz),
    ]
    ukis: dict[str, Path] = {}
    ukis["minimal"] = build_uki(UkiSpec([(".linux", kernel.vmlinuz)]), out / "minimal.efi")
    ukis["full"] = build_uki(UkiSpec(full_sections), out / "full.efi")
    ukis["modern"] = build_uki(UkiSpec(full_sections, stub_version="257.9-1"),
                               out / "modern.efi")
    ukis["multi"] = build_uki(UkiSpec([
        (".osrel", osrel), (".uname", uname), (".cmdline", b"console=ttyS0 base"),
        (".initrd", initrd), (".linux", kernel.vmlinuz),
        (".profile", b"ID=default\nTITLE=Default\n"),
        (".profile", b"ID=debug\nTITLE=Debugging\n"), (".cmdline", b"console=ttyS0 debug"),
        (".profile", b"ID=noinitrd\nTITLE=No initrd\n"), (".initrd", b""),
    ], stub_version="257.9-1"), out / "multi.efi")
    ukis["signed"] = sign(ukis["full"], keys["db"], out / "signed.efi")
    ukis["signed-other"] = sign(ukis["full"], keys["other"], out / "signed-other.efi")
    ukis["signed-twice"] = sign(ukis["signed-other"], keys["db"], out / "signed-twice.efi")
    tampered = bytearray(ukis["signed"].read_bytes())
    marker = tampered.find(b"relaunchd.test=full")
    tampered[marker:marker + 4] = b"EVIL"
    ukis["tampered"] = out / "tampered.efi"
    ukis["tampered"].write_bytes(bytes(tampered))
    ukis["parts"] = parts
    return ukis
