"""Sealed volumes against real tools: LUKS2 images made by `cryptsetup luksFormat` (a
regular file, no loop device), enrolled by systemd 252's own `systemd-cryptenroll`
against a software TPM (swtpm, through its TCTI), read back by relaunchd.

Oracles: the token's `tpm2-policy-hash` is what systemd had the TPM compute in a trial
session over the PCRs at enrolment, so relaunchd's digest over the same PCRs must equal
it (literal PCRs, a PIN, a signed policy); `tpm2_createpolicy --policy-pcr` (tpm2-tools,
the TPM's own PolicyPCR) for digests over arbitrary values in several banks;
`cryptsetup luksDump --dump-json-metadata` and `cryptsetup luksUUID` for the header.
Whether the TPM then *releases* the key is checked in the guest (tests/vm), where
systemd-cryptsetup can attach."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relaunchd.errors import InvalidVolume
from relaunchd.formats import luks2, luks_tokens, tpm_policy, unlock_prediction
from relaunchd.formats.pcr11 import PcrSigEntry
from relaunchd.platform import luks_device, pcr_values, sealed_volumes
from relaunchd.platform.sysroot import SysRoot
from support.swtpm import Swtpm, running_swtpm
from support.tools import require

PASSPHRASE = b"relaunchd-test-passphrase"
STUB_VAR = ("sys/firmware/efi/efivars/"
            "StubPcrKernelImage-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")


@pytest.fixture(autouse=True)
def _tools():
    require("cryptsetup", "systemd-cryptenroll", "swtpm", "tpm2_pcrextend", "tpm2_createpolicy")


@pytest.fixture
def tpm():
    with running_swtpm() as sw:
        yield sw


def run(cmd: list[str], sw: Swtpm | None = None, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    if sw is not None:
        full["TPM2TOOLS_TCTI"] = sw.tcti
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result


def luks_volume(path: Path) -> Path:
    """A 32 MiB LUKS2 image with a passphrase in key slot 0 (fast PBKDF: a test)."""
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    key = path.with_suffix(".key")
    key.write_bytes(PASSPHRASE)
    run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(path)])
    return path


def enroll(path: Path, sw: Swtpm, *args: str, **env: str) -> None:
    run(["systemd-cryptenroll", f"--tpm2-device={sw.tcti}", *args, str(path)],
        PASSWORD=PASSPHRASE.decode(), **env)
    # No resource manager between the tools and swtpm: what a client leaves loaded
    # stays, and a few enrolments fill the TPM's session slots.
    for kind in ("--transient-object", "--loaded-session", "--saved-session"):
        run(["tpm2_flushcontext", kind], sw)


def extend(sw: Swtpm, pcr: int, data: bytes) -> None:
    run(["tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}"], sw)


def pcrs_now(sw: Swtpm, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    got = pcr_values.read(SysRoot("/"), bank, pcrs, sw.tcti)
    assert not got.missing, got.missing
    return got.values


def header(path: Path) -> luks2.Luks2Header:
    return luks_device.read_header("/", str(path))[0]


def test_header_and_token_as_cryptsetup_and_systemd_wrote_them(tmp_path, tpm):
    vol = luks_volume(tmp_path / "vol.img")
    extend(tpm, 7, b"secure boot state")
    enroll(vol, tpm, "--tpm2-pcrs=7")
    ours = header(vol)
    dumped = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata", str(vol)]).stdout)
    assert ours.metadata == dumped
    assert ours.uuid == run(["cryptsetup", "luksUUID", str(vol)]).stdout.strip()
    assert ours.binary.hdr_size == 16384 and ours.binary.checksum_alg == "sha256"
    [sealing] = luks_tokens.tpm_sealings(ours)
    token = dumped["tokens"][str(sealing.token_id)]
    assert token["type"] == "systemd-tpm2"
    assert sealing.keyslots == tuple(int(k) for k in token["keyslots"])
    assert (sealing.bank, sealing.pcrs, sealing.pin) == ("sha256", (7,), False)
    # The oracle: the digest systemd had the TPM compute over PCR 7 at enrolment.
    values = pcrs_now(tpm, "sha256", [7])
    assert unlock_prediction.policy_digest(sealing, values) == sealing.policy_hash
    assert sealing.policy_hash.hex() == token["tpm2-policy-hash"]


def test_pin_adds_policy_auth_value(tmp_path, tpm):
    vol = luks_volume(tmp_path / "pin.img")
    extend(tpm, 7, b"secure boot state")
    enroll(vol, tpm, "--tpm2-pcrs=7", "--tpm2-with-pin=yes", NEWPIN="1234")
    [sealing] = luks_tokens.tpm_sealings(header(vol))
    assert sealing.pin is True
    values = pcrs_now(tpm, "sha256", [7])
    assert unlock_prediction.policy_digest(sealing, values) == sealing.policy_hash
    without = unlock_prediction.policy_digest(
        luks_tokens.TpmSealing(**{**sealing.__dict__, "pin": False}), values)
    assert without != sealing.policy_hash


def test_signed_policy_digest_and_pcrsig_verdict(tmp_path, tpm):
    """--tpm2-public-key: PolicyAuthorize over systemd's TPM form of the RSA key, then
    the literal PCR 7. Reproducing the token's digest proves the key's Name."""
    private = tmp_path / "pcr-private.pem"
    public = tmp_path / "pcr-public.pem"
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
         "-out", str(private)])
    run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)])
    vol = luks_volume(tmp_path / "signed.img")
    extend(tpm, 7, b"secure boot state")
    extend(tpm, 11, b"a unified kernel image")
    enroll(vol, tpm, "--tpm2-pcrs=7", f"--tpm2-public-key={public}",
           "--tpm2-public-key-pcrs=11")
    [sealing] = luks_tokens.tpm_sealings(header(vol))
    assert sealing.pubkey_pcrs == (11,) and sealing.pubkey_pem == public.read_bytes()
    values = pcrs_now(tpm, "sha256", [7, 11])
    assert unlock_prediction.policy_digest(sealing, values) == sealing.policy_hash

    # A `.pcrsig` signing today's PCR 11 (as systemd-measure signs a UKI's): it holds
    # while nothing extends PCR 11, and not once pcrphase does on the way down.
    pol = tpm_policy.policy_pcr(tpm_policy.empty_policy(),
                                [tpm_policy.PcrSelection("sha256", (11,))],
                                {"sha256": {11: values[11]}})
    key = load_pem_private_key(private.read_bytes(), password=None)
    entry = PcrSigEntry(bank="sha256", pcrs=(11,),
                        pkfp=unlock_prediction.public_key_fingerprint(public.read_bytes()),
                        policy=pol, signature=key.sign(pol, padding.PKCS1v15(), hashes.SHA256()))
    quiet = unlock_prediction.RelaunchModel(pcrsig=[entry])
    verdict = unlock_prediction.assess(sealing, {"sha256": values}, quiet)
    assert verdict.unlocks_after_relaunch and verdict.stale_pcrs == ()
    shutdown = unlock_prediction.RelaunchModel(pcrsig=[entry], extends={11: [
        unlock_prediction.Extend("pcrphase shutdown",
                                 {"sha256": hashlib.sha256(b"shutdown").digest()})]})
    verdict = unlock_prediction.assess(sealing, {"sha256": values}, shutdown)
    assert not verdict.unlocks_after_relaunch
    assert "does not sign the predicted PCR(s) 11" in verdict.reason


def test_pkfp_is_what_systemd_measure_writes(real_ukis):
    """pkfp of the test set's `.pcrsig` (made by systemd-measure sign) from its key."""
    parts = real_ukis["parts"]
    doc = json.loads((parts / "pcrsig.json").read_bytes().rstrip(b"\0"))
    fingerprint = unlock_prediction.public_key_fingerprint(
        (parts / "pcr-public.pem").read_bytes())
    assert {e["pkfp"] for bank in doc.values() for e in bank} == {fingerprint}


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384"])
def test_policy_pcr_equals_the_tpms_own(tmp_path, tpm, bank):
    size = tpm_policy.HASH_SIZES[bank]
    values = {0: bytes(range(size)), 7: bytes([0xA5]) * size, 15: hashlib.new(
        bank, b"x").digest(), 23: bytes(size)}
    blob = tmp_path / "values.bin"
    blob.write_bytes(b"".join(values[p] for p in sorted(values)))
    out = tmp_path / "policy.bin"
    run(["tpm2_createpolicy", "--policy-pcr", "-l", f"{bank}:23,15,0,7", "-f", str(blob),
         "-L", str(out)], tpm)
    ours = tpm_policy.policy_pcr(tpm_policy.empty_policy(),
                                 [tpm_policy.PcrSelection(bank, (23, 15, 0, 7))],
                                 {bank: values})
    assert ours == out.read_bytes()


def test_corrupt_primary_header_falls_back_to_the_secondary(tmp_path, tpm):
    vol = luks_volume(tmp_path / "vol.img")
    enroll(vol, tpm, "--tpm2-pcrs=7")
    good = header(vol)
    data = bytearray(vol.read_bytes()[:1 << 20])
    data[luks2.BINARY_HEADER_SIZE + 10] ^= 0xFF           # inside the primary's JSON
    with open(vol, "r+b") as f:
        f.write(data[:luks2.BINARY_HEADER_SIZE + 16])
    with pytest.raises(InvalidVolume, match="checksum"):
        luks2.parse_copy(bytes(data[:good.binary.hdr_size]), 0)
    fallback = header(vol)
    assert not fallback.binary.primary and fallback.metadata == good.metadata


def test_luks1_and_garbage_are_named_errors(tmp_path):
    luks1 = tmp_path / "luks1.img"
    with open(luks1, "wb") as f:
        f.truncate(8 << 20)
    key = tmp_path / "k"
    key.write_bytes(PASSPHRASE)
    run(["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--key-file", str(key),
         "--pbkdf-force-iterations", "1000", str(luks1)])
    with pytest.raises(InvalidVolume, match="LUKS1, not LUKS2"):
        header(luks1)
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(64 << 10))
    with pytest.raises(InvalidVolume, match="no LUKS header"):
        header(junk)


# --- the whole report, from a root tree ------------------------------------------------

def fixture_root(tmp_path: Path, sw: Swtpm, volumes: dict[str, Path], options: str = "",
                 pcrphase: bool = False) -> Path:
    """A root with /etc/crypttab naming the volumes by UUID, udev-style links to them,
    the swtpm's sha256 PCRs as the kernel exposes them in sysfs, and (pcrphase) the
    traces of a UKI boot that make systemd-pcrphase measure."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "dev" / "disk" / "by-uuid").mkdir(parents=True)
    lines = []
    for n, (name, image) in enumerate(volumes.items()):
        node = root / "dev" / f"vd{chr(ord('b') + n)}"
        node.hardlink_to(image)         # a regular file standing in for the block device
        uuid = header(image).uuid
        (root / "dev" / "disk" / "by-uuid" / uuid).symlink_to(f"../../{node.name}")
        lines.append(f"{name} UUID={uuid} none luks,tpm2-device=auto{options}")
    (root / "etc" / "crypttab").write_text("# test\n" + "\n".join(lines) + "\n")
    bank = root / "sys" / "class" / "tpm" / "tpm0" / "pcr-sha256"
    bank.mkdir(parents=True)
    for pcr, value in pcrs_now(sw, "sha256", list(range(24))).items():
        (bank / str(pcr)).write_text(value.hex().upper() + "\n")
    if pcrphase:
        (root / STUB_VAR).parent.mkdir(parents=True)
        (root / STUB_VAR).write_bytes(b"\x06\x00\x00\x00" + "11".encode("utf-16-le") + b"\0\0")
        unit = root / "lib" / "systemd" / "system" / "systemd-pcrphase.service"
        unit.parent.mkdir(parents=True)
        unit.write_text("[Service]\n")
    return root


def test_report_pcr7_unlocks_pcr15_extended_does_not(tmp_path, tpm):
    """The guest proof's two volumes, predicted from a root tree."""
    first = luks_volume(tmp_path / "first.img")
    second = luks_volume(tmp_path / "second.img")
    extend(tpm, 7, b"secure boot state")
    extend(tpm, 15, b"machine id")
    enroll(first, tpm, "--tpm2-pcrs=7")
    enroll(second, tpm, "--tpm2-pcrs=7+15")
    extend(tpm, 15, b"a volume key, measured at runtime")
    root = fixture_root(tmp_path, tpm, {"pcr7": first, "pcr7and15": second})
    report = {v["name"]: v for v in sealed_volumes.report(SysRoot(str(root)))}
    assert report["pcr7"]["unlocks_after_relaunch"] is True
    assert report["pcr7"]["pcrs"] == [7] and report["pcr7"]["stale_pcrs"] == []
    assert report["pcr7"]["tokens"][0]["pcr_source"] == "/sys/class/tpm/tpm0/pcr-sha256"
    assert report["pcr7and15"]["unlocks_after_relaunch"] is False
    assert report["pcr7and15"]["pcrs"] == [7, 15]
    assert "does not hold even now" in report["pcr7and15"]["reason"]
    assert "systemd-cryptenroll" in report["pcr7and15"]["remedy"]


def test_report_stale_and_pcrphase(tmp_path, tpm):
    """PCR 4 sealing unlocks only because PCR 4 keeps the old boot's value; PCR 11
    sealing breaks when systemd-pcrphase measures on the way down; PCR 23 breaks
    by relaunchd's own measurement."""
    vols = {name: luks_volume(tmp_path / f"{name}.img") for name in ("p4", "p11", "p23")}
    for pcr in (4, 11, 23):
        extend(tpm, pcr, f"boot {pcr}".encode())
    for name, image in vols.items():
        enroll(image, tpm, f"--tpm2-pcrs={name[1:]}")
    plain = {v["name"]: v for v in sealed_volumes.report(
        SysRoot(str(fixture_root(tmp_path / "a", tpm, vols))))}
    assert plain["p4"]["unlocks_after_relaunch"] is True and plain["p4"]["stale_pcrs"] == [4]
    assert "keep the old boot's values" in plain["p4"]["reason"]
    assert plain["p11"]["unlocks_after_relaunch"] is True and plain["p11"]["stale_pcrs"] == [11]
    assert plain["p23"]["unlocks_after_relaunch"] is False
    assert "relaunchd measures" in plain["p23"]["reason"]
    phased = {v["name"]: v for v in sealed_volumes.report(
        SysRoot(str(fixture_root(tmp_path / "b", tpm, vols, pcrphase=True))))}
    assert phased["p11"]["unlocks_after_relaunch"] is False
    assert "'shutdown'" in phased["p11"]["reason"] and "'final'" in phased["p11"]["reason"]
    unmeasured = sealed_volumes.report(
        SysRoot(str(fixture_root(tmp_path / "c", tpm, {"p23": vols["p23"]}))),
        sealed_volumes.Context(measurement_pcr=None))
    assert unmeasured[0]["unlocks_after_relaunch"] is True


def test_predicted_pcr11_after_pcrphase_is_a_real_extend(tmp_path, tpm):
    """The value the model predicts for PCR 11 is what the TPM holds after the same
    words are extended into it (as systemd-pcrphase does: the word's digest)."""
    extend(tpm, 11, b"stub")
    before = pcrs_now(tpm, "sha256", [11])
    model = sealed_volumes.model_for(
        SysRoot(str(fixture_root(tmp_path, tpm, {}, pcrphase=True))),
        sealed_volumes.crypttab.CrypttabEntry("v", "/dev/vdb", None, (), 1),
        sealed_volumes.Context(measurement_pcr=None), ["sha256"])
    predicted, unknown = unlock_prediction.predicted_values(before, "sha256", [11], model)
    for word in ("shutdown", "final"):
        run(["tpm2_pcrextend", f"11:sha256={hashlib.sha256(word.encode()).hexdigest()}"], tpm)
    assert not unknown and predicted == pcrs_now(tpm, "sha256", [11])


def test_clevis_token_policy_from_its_sealed_object(tmp_path, tpm):
    """A clevis tpm2 token as `clevis luks bind` stores it; its policy is the authPolicy
    of jwk_pub — here a real TPM2B_PUBLIC made by tpm2_create with a PolicyPCR."""
    extend(tpm, 7, b"secure boot state")
    policy = tmp_path / "pcr.policy"
    run(["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:7", "-L", str(policy)], tpm)
    run(["tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c",
         str(tmp_path / "primary.ctx")], tpm)
    secret = tmp_path / "jwk.json"
    secret.write_text('{"alg":"A256GCM","k":"not-a-real-key","kty":"oct"}')
    run(["tpm2_create", "-C", str(tmp_path / "primary.ctx"), "-g", "sha256",
         "-a", "fixedtpm|fixedparent|noda|adminwithpolicy", "-u", str(tmp_path / "jwk.pub"),
         "-r", str(tmp_path / "jwk.priv"), "-L", str(policy), "-i", str(secret)], tpm)
    b64u = lambda data: base64.urlsafe_b64encode(data).rstrip(b"=").decode()  # noqa: E731
    protected = {"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "tpm2", "tpm2": {
        "hash": "sha256", "key": "ecc", "pcr_bank": "sha256", "pcr_ids": "7",
        "jwk_pub": b64u((tmp_path / "jwk.pub").read_bytes()),
        "jwk_priv": b64u((tmp_path / "jwk.priv").read_bytes())}}}
    token = {"type": "clevis", "keyslots": ["1"], "jwe": {
        "protected": b64u(json.dumps(protected).encode()), "iv": "", "ciphertext": "",
        "tag": "", "encrypted_key": ""}}
    sealing = luks_tokens.clevis_token(2, token)
    assert sealing.policy_hash == policy.read_bytes()
    values = pcrs_now(tpm, "sha256", [7])
    verdict = unlock_prediction.assess(sealing, {"sha256": values},
                                       unlock_prediction.RelaunchModel())
    assert verdict.matches_now and verdict.unlocks_after_relaunch
    tang = {**protected, "clevis": {"pin": "tang", "tang": {}}}
    assert luks_tokens.clevis_token(3, {**token, "jwe": {
        "protected": b64u(json.dumps(tang).encode())}}) is None


def test_check_cli_reports_volumes_under_root(tmp_path, tpm):
    """`relaunchctl check --json --root` carries the prediction as "volumes"; the human
    report says which volume will not unlock and what to do."""
    first = luks_volume(tmp_path / "first.img")
    second = luks_volume(tmp_path / "second.img")
    extend(tpm, 7, b"secure boot state")
    enroll(first, tpm, "--tpm2-pcrs=7")
    enroll(second, tpm, "--tpm2-pcrs=7+15")
    extend(tpm, 15, b"measured at runtime")
    root = fixture_root(tmp_path, tpm, {"data1": first, "data2": second})
    cli = [sys.executable, "-m", "relaunchd.cli", "check", "--root", str(root)]
    done = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    volumes = {v["name"]: v for v in json.loads(done.stdout)["volumes"]}
    assert set(volumes) == {"data1", "data2"}
    assert volumes["data1"]["unlocks_after_relaunch"] is True
    assert volumes["data2"]["unlocks_after_relaunch"] is False
    for v in volumes.values():
        assert {"name", "device", "pcrs", "unlocks_after_relaunch", "stale_pcrs", "reason",
                "remedy"} <= set(v)
    human = subprocess.run(cli, capture_output=True, text=True, timeout=60).stdout
    assert "data1 (UUID=" in human and "PCRs 7): unlocks" in human
    assert "data2 (UUID=" in human and "PCRs 7+15): DOES NOT UNLOCK" in human


def test_broken_crypttab_is_reported_not_a_traceback(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "crypttab").write_text("only-one-field\n")
    done = subprocess.run([sys.executable, "-m", "relaunchd.cli", "check", "--json",
                           "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr
    [entry] = json.loads(done.stdout)["volumes"]
    assert entry["unlocks_after_relaunch"] is False
    assert "InvalidVolume: /etc/crypttab line 1: 1 fields" in entry["reason"]
