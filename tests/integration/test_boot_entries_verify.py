"""Whether a boot entry's kernel verifies: Type #1 `linux` images (Debian's signed
vmlinuz, the same kernel signed by the test db key, stripped of its signature, not a PE
at all) and Type #2 UKIs (signed, tampered), each verdict checked against
`sbverify --cert`. Plus the one check the unit tests cannot make without a mount:
a kernel path that crosses into another file system is not followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relaunchd.errors import InvalidBootEntry
from relaunchd.formats import authenticode, pe
from relaunchd.formats import boot_entries as fmt
from relaunchd.platform import boot_entries, trust_store
from relaunchd.platform.sysroot import SysRoot
from support import ukibuild


def debian_signer_pem(vmlinuz: Path, out: Path) -> Path:
    fd = os.open(vmlinuz, os.O_RDONLY)
    try:
        [sig] = authenticode.read_signatures(fd, pe.parse_headers(
            pe.FileRange(fd, 0, os.fstat(fd).st_size)))
    finally:
        os.close(fd)
    cert = x509.load_der_x509_certificate(sig.certificates[0])
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


@pytest.fixture(scope="module")
def machine(tmp_path_factory, debian_kernel, keys, real_ukis):
    root = tmp_path_factory.mktemp("machine")
    esp = root / "efi"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    kernels = esp / "kernels"
    kernels.mkdir()
    (kernels / "debian").write_bytes(debian_kernel.vmlinuz.read_bytes())
    ukibuild.sign(debian_kernel.vmlinuz, keys["db"], kernels / "db-signed")
    unsigned = kernels / "unsigned"
    unsigned.write_bytes(debian_kernel.vmlinuz.read_bytes())
    ukibuild.run(["sbattach", "--remove", str(unsigned)])
    (kernels / "text").write_text("not a PE image\n")
    (esp / "initrd.img").write_bytes(b"initrd")
    for i, name in enumerate(("debian", "db-signed", "unsigned", "text")):
        (esp / "loader" / "entries" / f"{name}.conf").write_text(
            f"title {name}\nsort-key t1\nversion {i}\nlinux /kernels/{name}\n"
            "initrd /initrd.img\noptions root=/dev/vda quiet\n")
    for name in ("signed", "tampered", "full"):
        (esp / "EFI" / "Linux" / f"{name}.efi").write_bytes(real_ukis[name].read_bytes())
    return root


def test_type1_and_type2_verdicts_agree_with_sbverify(machine, keys, debian_kernel, tmp_path):
    debian_pem = debian_signer_pem(debian_kernel.vmlinuz, tmp_path / "debian.pem")
    for trusted_pem, verified in (
            (keys["db"].cert, {"db-signed.conf", "signed.efi"}),
            (debian_pem, {"debian.conf", "db-signed.conf"}),   # sbsign kept Debian's signature
            (keys["other"].cert, set())):
        trusted = trust_store.load_certificates([str(trusted_pem)])
        listing = boot_entries.list_entries(SysRoot(str(machine)), esp="/efi", trusted=trusted)
        verdicts = {e.id: e.verified for e in listing.entries}
        assert {i for i, v in verdicts.items() if v} == verified, trusted_pem
        for listed in listing.entries:
            host = machine / listed.to_json()["kernel"].lstrip("/")
            if listed.entry.kernel.endswith("text"):
                assert not listed.verified
                assert "not a PE image" in listed.verification.reasons[0]
                continue
            assert listed.verified == ukibuild.sbverify(host, trusted_pem), listed.id


def test_entry_facts_and_refusals(machine, keys):
    trusted = trust_store.load_certificates([str(keys["db"].cert)])
    listing = boot_entries.list_entries(SysRoot(str(machine)), esp="/efi", trusted=trusted)
    entries = {e.id: e for e in listing.entries}
    signed = entries["db-signed.conf"]
    data = signed.to_json()
    assert data["kernel"] == "/efi/kernels/db-signed"
    assert data["initrd"] == ["/efi/initrd.img"] and data["options"] == "root=/dev/vda quiet"
    assert data["signed_parts"] == ["kernel"]
    assert data["unsigned_parts"] == ["initrd", "options"]
    assert data["verified_by"] == keys["db"].subject
    boot_entries.require_stageable(signed)
    with pytest.raises(InvalidBootEntry, match="not-verified"):
        boot_entries.require_stageable(entries["unsigned.conf"])
    uki = entries["signed.efi"].to_json()
    assert uki["signed_parts"] == ["image"] and uki["unsigned_parts"] == []
    assert uki["uname"] == ukibuild.debian_kernel().release
    assert uki["options"] == ukibuild.CMDLINE.decode()
    assert uki["title"] == "Debian GNU/Linux 12 (bookworm)" and uki["version"] == "12 (bookworm)"
    assert not entries["tampered.efi"].verified
    assert "tampered" in " ".join(entries["tampered.efi"].verification.reasons)


def test_a_mount_inside_the_partition_is_not_crossed(tmp_path):
    """In a private mount namespace: /efi/kernels is another file system (a tmpfs);
    an entry whose linux lies on it is not listed by relaunchd (the loader reading the
    FAT partition would not find the file either)."""
    (tmp_path / "efi" / "loader" / "entries").mkdir(parents=True)
    (tmp_path / "efi" / "kernels").mkdir()
    (tmp_path / "efi" / "vmlinuz").write_text("k")
    for name, path in (("inside", "/vmlinuz"), ("mounted", "/kernels/vmlinuz")):
        (tmp_path / "efi" / "loader" / "entries" / f"{name}.conf").write_text(
            f"title {name}\nlinux {path}\n")
    script = textwrap.dedent(f"""
        import json, subprocess
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "{tmp_path}/efi/kernels"], check=True)
        open("{tmp_path}/efi/kernels/vmlinuz", "w").write("k")
        from relaunchd.platform import boot_entries
        from relaunchd.platform.sysroot import SysRoot
        listing = boot_entries.list_entries(SysRoot("{tmp_path}"), esp="/efi")
        print(json.dumps({{e.id: [[p.reason, p.detail] for p in e.entry.problems]
                          for e in listing.entries}}))
    """)
    proc = subprocess.run(["unshare", "-m", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    problems = json.loads(proc.stdout)
    assert problems["inside.conf"] == []
    [[reason, detail]] = problems["mounted.conf"]
    assert reason == fmt.KERNEL_MISSING
    assert "crosses into another file system" in detail
