"""Relaunching into what the boot loader would boot next, end to end in a UEFI guest.

OVMF starts the real systemd-boot 252 from a writable ESP holding one Type #1 entry of
the guest's kernel. In the guest, relaunchd is installed from its .deb (with its
kernel-install plugin) and trusts the test db key (UKIs) and Debian's kernel signing
certificate (a distribution-signed vmlinuz, as in a Type #1 entry). Then, as an
administrator's package manager would:

1. `kernel-install add` of a UKI (kernel-install 252 has no `layout=uki`: a site plugin
   copies it to EFI/Linux/, as systemd 253's 90-uki-copy.install does) with
   `auto_stage: off` stages nothing; with `auto_stage: next-boot` the plugin — the real
   relaunchctl against the real daemon — stages the new entry;
   `relaunchctl relaunch --wait` relaunches into it and the new boot is verified and runs
   the UKI's command line.
2. `kernel-install add` of a Type #1 entry (90-loaderentry.install): refused while
   `trust.allow_unsigned_initrd` is false (the installation still succeeds), staged once
   it is true — kernel and initrd digests those of the installed files, the entry's
   options the command line; removing another kernel leaves the stage alone, removing
   this one cancels it; staged again and relaunched into: verified, /proc/cmdline the
   entry's options, the PCR 23 log (read by tpm2_eventlog) holding the digests of the
   installed kernel, initrd and options.
3. `LoaderEntryOneShot`, written as `bootctl set-oneshot` writes it, changes what
   `relaunchctl stage --next-boot` stages.
One firmware boot and two kexec relaunches for all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relaunchd.formats import authenticode, pe
from support import ukibuild

from .image import GuestImage, make_data_disk
from .machine import Machine, MachineSpec
from .uefi import SYSTEMD_BOOT

BOOT_TIMEOUT = 900
KEXEC_TIMEOUT = 600
GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
CONFIG = "/etc/relaunchd/relaunchd.yaml"
TOKEN = "rld"                                   # /etc/kernel/entry-token
UKI_KVER = "6.1.0-rld-uki"
T1_KVER = "6.1.0-rld-type1"
BASE_ID = "rld-base.conf"
UKI_ID = f"{TOKEN}-{UKI_KVER}.efi"              # what kernel-install names them
T1_ID = f"{TOKEN}-{T1_KVER}.conf"

# Stand-in for systemd 253's 90-uki-copy.install on kernel-install 252 (which knows no
# layout=uki): the UKI given to `kernel-install add` becomes $BOOT/EFI/Linux/TOKEN-KVER.efi.
# Numbered below 90-relaunchd.install so the UKI is there when relaunchd is asked.
UKI_COPY = b"""#!/bin/sh
set -e
[ "$KERNEL_INSTALL_LAYOUT" = uki ] || exit 0
target="$KERNEL_INSTALL_BOOT_ROOT/EFI/Linux/$KERNEL_INSTALL_ENTRY_TOKEN-$2.efi"
case "$1" in
    add) install -D -m 0644 "$4" "$target" ;;
    remove) rm -f "$target" ;;
esac
"""
# Read the measurement log with tpm2_eventlog (tpm2-tools), not relaunchd's parser:
# [[event text, sha256 hex], ...] of the PCR 23 events.
LOG_EVENTS = """python3 - <<'PY'
import json, subprocess, yaml
out = subprocess.run(["tpm2_eventlog", "/var/lib/relaunchd/measurements.log"],
                     capture_output=True, text=True, check=True).stdout
events = []
for e in yaml.safe_load(out)["events"]:
    if e["PCRIndex"] != 23:
        continue
    digest = next(d["Digest"] for d in e["Digests"] if d["AlgorithmId"] == "sha256")
    events.append([json.dumps(e.get("Event")), digest])
print(json.dumps(events))
PY"""


def set_oneshot(entry: str) -> str:
    """What `bootctl set-oneshot ENTRY` does (systemd's efi_set_variable): lift the
    immutable flag efivarfs puts on an existing variable, then write attributes NV|BS|RT
    and the UTF-16LE name with its NUL in one write."""
    path = f"/sys/firmware/efi/efivars/LoaderEntryOneShot-{GUID}"
    return f"""{{ [ ! -e {path} ] || chattr -i {path}; }} && python3 - <<'PY'
import os
fd = os.open("{path}", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"\\x07\\0\\0\\0" + "{entry}\\0".encode("utf-16-le"))
os.close(fd)
PY"""


def detached(command: str) -> str:
    """A relaunch request run outside the agent, which the shutdown it starts may kill."""
    return f'setsid -f sh -c "{command}" >/run/rld-request.out 2>&1 </dev/null'


def debian_signer(vmlinuz: Path, out: Path) -> Path:
    """The certificate that signed Debian's kernel: what a site trusts for Type #1."""
    fd = os.open(vmlinuz, os.O_RDONLY)
    try:
        signatures = authenticode.read_signatures(fd, pe.parse_headers(
            pe.FileRange(fd, 0, os.fstat(fd).st_size)))
    finally:
        os.close(fd)
    cert = x509.load_der_x509_certificate(signatures[0].certificates[0])
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def build_esp(image: GuestImage, work: Path) -> Path:
    """systemd-boot and one Type #1 entry of the guest's kernel, sorted last (sort key
    zzz) so that whatever kernel-install adds (sort key debian) comes first."""
    esp = work / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(SYSTEMD_BOOT.read_bytes())
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "loader" / "loader.conf").write_text("timeout 0\n")
    (esp / "base").mkdir()
    (esp / "base" / "vmlinuz").write_bytes(image.kernel.read_bytes())
    (esp / "base" / "initrd.img").write_bytes(image.initrd.read_bytes())
    (esp / "loader" / "entries" / BASE_ID).write_text(
        "title relaunchd guest (base)\nsort-key zzz\nversion 0\nlinux /base/vmlinuz\n"
        f"initrd /base/initrd.img\noptions {image.cmdline} rld.entry=base\n")
    return esp


def build_uki(image: GuestImage, keys, work: Path, marker: str) -> Path:
    """The guest's kernel and initrd as a UKI signed by the test db key; sort key debian,
    version 1."""
    spec = ukibuild.UkiSpec([
        (".osrel", b'PRETTY_NAME="relaunchd guest (UKI)"\nID=debian\nVERSION_ID=1\n'),
        (".cmdline", f"{image.cmdline} {marker}".encode()),
        (".uname", image.release.encode()), (".initrd", image.initrd),
        (".linux", image.kernel)])
    return ukibuild.sign(ukibuild.build_uki(spec, work / "next.unsigned.efi"), keys["db"],
                         work / "next.efi")


@pytest.fixture(scope="module")
def entries_guest(vm_image, relaunchd_deb, keys, tmp_path_factory, vm_timings
                  ) -> Iterator[tuple[Machine, dict]]:
    work = tmp_path_factory.mktemp("vm-relaunch-entries")
    markers = {"uki": f"rld.entry=uki-{uuid.uuid4().hex[:12]}",
               "type1": f"rld.entry=type1-{uuid.uuid4().hex[:12]}"}
    esp = build_esp(vm_image, work)
    data = make_data_disk({"relaunchd.deb": relaunchd_deb,
                           "next.efi": build_uki(vm_image, keys, work, markers["uki"]),
                           "db.pem": keys["db"].cert,
                           "debian.pem": debian_signer(vm_image.kernel, work / "debian.pem")},
                          work / "data.img")
    # Room for a UKI and a second kernel and initrd, which kernel-install adds.
    spare = 2 * (vm_image.kernel.stat().st_size + vm_image.initrd.stat().st_size) // 2**20 + 64
    with Machine(MachineSpec(vm_image, data_disk=data, esp=esp, esp_spare_mib=spare)) as guest:
        boot = guest.boot(timeout=BOOT_TIMEOUT)
        vm_timings.add("uefi_boot_to_ready", boot.seconds)
        guest.run("mountpoint -q /srv/rld || mount /srv/rld; /usr/local/sbin/rld-provision"
                  " && python3 -c 'import relaunchd'", timeout=300)
        guest.run("mkdir -p /efi && echo 'LABEL=ESP /efi vfat rw,nofail,fmask=0022,"
                  "dmask=0022 0 0' >> /etc/fstab && systemctl daemon-reload && mount /efi && "
                  "install -d /etc/relaunchd /etc/kernel/install.d && "
                  "cp /srv/rld/db.pem /srv/rld/debian.pem /etc/relaunchd/ && "
                  f"echo {TOKEN} > /etc/kernel/entry-token && "
                  f"echo '{vm_image.cmdline} {markers['type1']}' > /etc/kernel/cmdline")
        guest.put("/etc/kernel/install.d/85-rld-uki-copy.install", UKI_COPY, mode=0o755)
        assert "rld.entry=base" in guest.run("cat /proc/cmdline").output
        yield guest, markers
        guest.poweroff()


def configure(guest: Machine, *, auto_stage: str, allow_unsigned_initrd: bool) -> None:
    guest.put(CONFIG, f"""# written by tests/vm/test_relaunch_entries.py
auto_stage: {auto_stage}
trust:
  certificates: [/etc/relaunchd/db.pem, /etc/relaunchd/debian.pem]
  allow_unsigned_initrd: {str(allow_unsigned_initrd).lower()}
launch:
  method: kexec
""".encode())
    guest.run("relaunchd --check-config && systemctl restart relaunchd")


def kernel_install(guest: Machine, layout: str, *args: str) -> str:
    """kernel-install 252 as a package manager runs it; its output (the plugin logs
    there). It must succeed whatever relaunchd says."""
    return guest.run(f"printf 'layout={layout}\\nBOOT_ROOT=/efi\\n' > /etc/kernel/install.conf"
                     f" && kernel-install {' '.join(args)} 2>&1", timeout=900).output


def status(guest: Machine) -> dict:
    return json.loads(guest.run("relaunchctl status --json").output)


def sha256_of(guest: Machine, path: str) -> str:
    return guest.run(f"sha256sum {path}").output.split()[0]


def relaunch(guest: Machine, vm_timings, name: str) -> dict:
    """relaunchctl relaunch --wait; the new boot's LastRelaunch."""
    staged = status(guest)["StagedImage"]
    old = guest.boot_id()
    boot = guest.transition(detached("relaunchctl relaunch --wait"), timeout=KEXEC_TIMEOUT)
    vm_timings.add(name, boot.seconds)
    assert boot.boot_id != old
    guest.run("mountpoint -q /efi || mount /efi")
    last = status(guest)["LastRelaunch"]
    assert last["id"] == staged["id"] and last["verified"] is True, last
    assert last["measured"] is True and last["mismatches"] == [], last
    assert guest.run("cat /proc/cmdline").output.strip() == staged["cmdline"]
    return last


def test_kernel_install_of_a_uki_is_auto_staged_and_relaunched_into(entries_guest, vm_timings):
    guest, markers = entries_guest
    configure(guest, auto_stage="off", allow_unsigned_initrd=False)
    out = kernel_install(guest, "uki", "add", UKI_KVER, "/srv/rld/next.efi")
    assert "relaunchd-kernel-install: staging the next boot entry" in out, out
    assert '"id": null' in out and status(guest)["State"] == "idle", out

    configure(guest, auto_stage="next-boot", allow_unsigned_initrd=False)
    out = kernel_install(guest, "uki", "add", UKI_KVER, "/srv/rld/next.efi")
    staged = status(guest)["StagedImage"]
    assert staged.get("entry", {}).get("id") == UKI_ID, out
    assert staged["entry"]["type"] == "type2" and staged["path"] == f"/efi/EFI/Linux/{UKI_ID}"
    assert staged["signed"] == ["image"] and staged["unsigned"] == []
    assert f'"id": "{staged["id"]}"' in out

    relaunch(guest, vm_timings, "relaunch_into_uki_entry_to_ready")
    assert markers["uki"] in guest.run("cat /proc/cmdline").output.split()


def test_kernel_install_of_a_type1_entry_is_staged_honestly_and_relaunched_into(
        entries_guest, vm_timings):
    guest, markers = entries_guest
    release = guest.run("uname -r").output.strip()
    kernel, initrd = f"/boot/vmlinuz-{release}", f"/boot/initrd.img-{release}"
    add = ("add", T1_KVER, kernel, initrd)
    # Its initrd and options are signed by no one: refused, and the installation goes on.
    out = kernel_install(guest, "bls", *add)
    assert "trust.allow_unsigned_initrd" in out and "kernel installation unaffected" in out
    assert status(guest)["State"] == "idle"
    assert guest.run(f"test -e /efi/loader/entries/{T1_ID}", check=False).ok

    configure(guest, auto_stage="next-boot", allow_unsigned_initrd=True)
    kernel_install(guest, "bls", *add)
    staged = status(guest)["StagedImage"]
    assert staged.get("entry", {}).get("id") == T1_ID, staged
    entry_dir = f"/efi/{TOKEN}/{T1_KVER}"
    assert staged["path"] == f"/efi/loader/entries/{T1_ID}"
    assert staged["signed"] == ["kernel"] and staged["unsigned"] == ["initrd", "options"]
    assert staged["kernel_sha256"] == sha256_of(guest, f"{entry_dir}/linux")
    assert staged["initrd_sha256"] == sha256_of(guest, f"{entry_dir}/initrd.img-{release}")
    options = guest.run("cat /etc/kernel/cmdline").output.strip()
    assert staged["cmdline"] == f"{options} relaunchd.id={staged['id']}"

    # What the loader would do, as relaunchd lists it: this entry first, every kernel
    # verified against the configured trust (Debian's signer for the Type #1 ones).
    items = json.loads(guest.run("relaunchctl images --json", timeout=300).output)
    loader = next(i for i in items if i["kind"] == "boot-loader")
    assert loader["esp"] == "/efi" and loader["loader"].startswith("systemd-boot 252")
    assert (loader["next_boot"], loader["next_boot_reason"]) == (T1_ID, "first entry")
    entries = [i for i in items if i["kind"] == "boot-entry"]
    assert [e["id"] for e in entries] == [T1_ID, UKI_ID, BASE_ID]
    assert all(e["verified"] is True for e in entries), entries

    # Removing another kernel leaves the stage alone; removing this one cancels it.
    out = kernel_install(guest, "bls", "remove", "6.1.0-not-installed")
    assert '"cancelled": false' in out and status(guest)["State"] == "staged", out
    out = kernel_install(guest, "bls", "remove", T1_KVER)
    assert '"cancelled": true' in out and status(guest)["State"] == "idle", out
    assert not guest.run(f"test -e /efi/loader/entries/{T1_ID}", check=False).ok

    kernel_install(guest, "bls", *add)
    staged = status(guest)["StagedImage"]
    assert staged["entry"]["id"] == T1_ID
    expected = {"kernel": sha256_of(guest, f"{entry_dir}/linux"),
                "initrd": sha256_of(guest, f"{entry_dir}/initrd.img-{release}"),
                "cmdline": hashlib.sha256(staged["cmdline"].encode()).hexdigest()}
    relaunch(guest, vm_timings, "relaunch_into_type1_entry_to_ready")
    running = guest.run("cat /proc/cmdline").output.split()
    assert markers["type1"] in running and f"relaunchd.id={staged['id']}" in running
    assert not any(word.startswith("initrd=") for word in running)
    # The PCR 23 log, read by tpm2_eventlog: the last three events are this relaunch's
    # kernel, initrd and command line, with the digests of the installed files.
    events = json.loads(guest.run(LOG_EVENTS).output)[-3:]
    assert [digest for _, digest in events] == [expected["kernel"], expected["initrd"],
                                                expected["cmdline"]], events
    # tpm2_eventlog shows EV_IPL data as text (or hex in older versions).
    assert all(staged["id"] in text or staged["id"].encode().hex() in text
               for text, _ in events), events


def test_the_oneshot_entry_is_what_next_boot_stages(entries_guest):
    guest, _ = entries_guest
    for entry in (UKI_ID, T1_ID):
        guest.run(set_oneshot(entry))
        items = json.loads(guest.run("relaunchctl images --json", timeout=300).output)
        loader = next(i for i in items if i["kind"] == "boot-loader")
        assert (loader["next_boot"], loader["next_boot_reason"]) == (entry,
                                                                     "LoaderEntryOneShot")
        assert loader["default"] == T1_ID
        staged = json.loads(guest.run("relaunchctl stage --next-boot --json",
                                      timeout=600).output)["staged"]
        assert staged["entry"]["id"] == entry
    guest.run("relaunchctl cancel")
