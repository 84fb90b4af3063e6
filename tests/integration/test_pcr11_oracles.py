"""PCR 11 predictions against independent oracles on real UKIs.

- `systemd-measure calculate` (systemd 252, Debian's) on sections extracted
  with pefile (not with relaunchd's parser), all four banks, with and without
  phases, for every UKI its 252 section set can describe.
- For stubs newer than the 252 tool knows (.uname/.sbat/.profile measured),
  a real TPM (swtpm) extends a resettable PCR with digests from `sha256sum`
  and the result is read back with tpm2_pcrread.
- `.pcrsig` made by `systemd-measure sign` must match our prediction in every
  bank and phase, with valid signatures.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pefile
import pytest

from relaunchd.formats.image_report import inspect_image
from relaunchd.formats.pcr11 import BANKS, DEFAULT_PHASES
from relaunchd.platform.image_files import open_image
from support import ukibuild
from support.swtpm import running_swtpm

TOOL_252 = {".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey"}


def extract_sections(image: Path, out: Path, indices: list[int] | None = None) -> dict:
    """Measured images (payload zero-padded to VirtualSize) via pefile, first match
    per name unless `indices` picks the sections explicitly."""
    pe = pefile.PE(str(image), fast_load=True)
    result: dict[str, Path] = {}
    for i, s in enumerate(pe.sections):
        name = s.Name.rstrip(b"\0").decode()
        if (indices is not None and i not in indices) or (indices is None and name in result):
            continue
        payload = s.get_data()[: min(s.Misc_VirtualSize, s.SizeOfRawData)]
        data = payload.ljust(s.Misc_VirtualSize, b"\0")
        path = out / f"{i}{name}"
        path.write_bytes(data)
        result[name] = path
    pe.close()
    return result


def inspect_json(path: Path, **kw) -> dict:
    with open_image(str(path)) as image:
        return inspect_image(image, **kw).to_json()


@pytest.mark.parametrize("name", ["minimal", "full", "signed", "signed-twice"])
def test_matches_systemd_measure(real_ukis, tmp_path, name):
    report = inspect_json(real_ukis[name])
    files = {n: p for n, p in extract_sections(real_ukis[name], tmp_path).items()
             if n in TOOL_252 and p.stat().st_size}
    assert set(report["measured_sections"]) == set(files)
    oracle = ukibuild.systemd_measure(files, list(BANKS), [":"])
    assert report["pcr11"] == oracle[""], "after the sections, no phase"
    oracle_phases = ukibuild.systemd_measure(files, list(BANKS))
    assert set(oracle_phases) == set(DEFAULT_PHASES)
    for phase in DEFAULT_PHASES:
        assert report["pcr11_phases"][phase] == oracle_phases[phase], phase


def test_sha256_only_matches_all_bank_run(real_ukis):
    full = inspect_json(real_ukis["full"])
    only = inspect_json(real_ukis["full"], banks=("sha256",))
    assert list(only["pcr11"]) == ["sha256"]
    assert only["pcr11"]["sha256"] == full["pcr11"]["sha256"]


def test_section_digests_are_of_virtual_size(real_ukis, tmp_path):
    report = inspect_json(real_ukis["full"])
    files = extract_sections(real_ukis["full"], tmp_path)
    for section in report["sections"]:
        if section["name"] in files:
            data = files[section["name"]].read_bytes()
            assert section["size"] == len(data)
            assert section["sha256"] == hashlib.sha256(data).hexdigest()


def test_pcrsig_from_systemd_measure_sign_matches(real_ukis):
    report = inspect_json(real_ukis["full"])
    assert report["pcrsig"] is not None
    for bank in BANKS:
        for phase in DEFAULT_PHASES:
            check = report["pcrsig"][bank][phase]
            assert check == {"matches": True, "signature_valid": True}, (bank, phase)


def test_pcrsig_does_not_match_other_profile_or_stub(real_ukis):
    """The 'modern' UKI claims a 257 stub, which also measures .uname/.sbat: the
    252-era signed policy must no longer match."""
    report = inspect_json(real_ukis["modern"])
    assert ".uname" in report["measured_sections"]
    assert all(not c["matches"] for phases in report["pcrsig"].values()
               for c in phases.values())


def _tpm_replay(tcti: str, files: list[tuple[str, Path]], banks: list[str]) -> dict[str, str]:
    """Extend PCR 16 (resettable) on a real TPM: H(name\\0), H(section) per section."""
    def tpm(*args: str) -> str:
        return subprocess.run(["tpm2_" + args[0], "-T", tcti, *args[1:]], check=True,
                              capture_output=True, text=True).stdout

    tpm("pcrreset", "16")
    for name, path in files:
        for bank in banks:
            name_digest = subprocess.run(
                [f"{bank}sum"], input=name.encode() + b"\0", capture_output=True, check=True
            ).stdout.split()[0].decode()
            data_digest = subprocess.run([f"{bank}sum", str(path)], capture_output=True,
                                         check=True).stdout.split()[0].decode()
            tpm("pcrextend", f"16:{bank}={name_digest}")
            tpm("pcrextend", f"16:{bank}={data_digest}")
    out = tpm("pcrread", "+".join(f"{b}:16" for b in banks))
    values: dict[str, str] = {}
    bank = None
    for line in out.splitlines():
        line = line.strip()
        if line.endswith(":") and not line.startswith("16"):
            bank = line[:-1]
        elif line.startswith("16") and bank:
            values[bank] = line.split(":", 1)[1].strip().lower().removeprefix("0x")
    return values


@pytest.mark.parametrize("profile", [0, 1, 2])
def test_profiles_and_new_stub_against_real_tpm(real_ukis, tmp_path, profile):
    image = real_ukis["multi"]
    pe = pefile.PE(str(image), fast_load=True)
    index = {i: s.Name.rstrip(b"\0").decode() for i, s in enumerate(pe.sections)}
    pe.close()
    profile_starts = [i for i, n in index.items() if n == ".profile"]
    base = {n: i for i, n in reversed(list(index.items())) if i < profile_starts[0]}
    end = profile_starts[profile + 1] if profile + 1 < len(profile_starts) else len(index)
    chosen = dict(base)
    for i in range(profile_starts[profile], end):
        chosen[index[i]] = i
    files = extract_sections(image, tmp_path, list(chosen.values()))
    # A 257 stub measures these, in systemd's enum order; empty ones mask/skip.
    order = [".linux", ".osrel", ".cmdline", ".initrd", ".uname", ".sbat", ".profile"]
    measured = [(n, files[n]) for n in order if n in files and files[n].stat().st_size]
    report = inspect_json(image, profile=profile)
    assert report["measured_sections"] == [n for n, _ in measured]
    with running_swtpm() as tpm:
        expected = _tpm_replay(tpm.tcti, measured, ["sha1", "sha256"])
    assert report["pcr11"]["sha1"] == expected["sha1"]
    assert report["pcr11"]["sha256"] == expected["sha256"]


def test_profile_views(real_ukis):
    r0 = inspect_json(real_ukis["multi"])
    r1 = inspect_json(real_ukis["multi"], profile=1)
    r2 = inspect_json(real_ukis["multi"], profile=2)
    assert [p["ID"] for p in r0["profiles"]] == ["default", "debug", "noinitrd"]
    assert (r0["profile"], r0["cmdline"]) == (0, "console=ttyS0 base")
    assert (r1["profile"], r1["cmdline"]) == (1, "console=ttyS0 debug")
    assert ".initrd" in r0["measured_sections"]
    assert ".initrd" not in r2["measured_sections"], "a 0-size section masks the base one"
    assert r2["cmdline"] == "console=ttyS0 base"


def test_cli_json_keys(real_ukis, capsys):
    from relaunchd.cli import main

    assert main(["inspect", "--json", str(real_ukis["signed"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("path", "sections", "os_release", "uname", "cmdline", "profiles",
                "stub_version", "signature", "pcr11", "pcr11_phases", "pcrsig"):
        assert key in doc, key
    assert "error" not in doc
    assert doc["stub_version"] == "252.39-1~deb12u2" or doc["stub_version"].startswith("252")
    assert doc["os_release"]["ID"] == "debian"
    assert doc["signature"]["signed"] is True
    assert doc["signature"]["signers"] == ["CN=relaunchd test db"]
    assert set(doc["pcr11_phases"]) == set(DEFAULT_PHASES)


def test_inspecting_an_unsigned_image_never_imports_cryptography(real_ukis):
    """`inspect` of an unsigned UKI without .pcrsig must not pay for cryptography's
    import (~70 ms of a ~200 ms run; README "Performance"); a signed one (or .pcrsig,
    --cert) needs it. The restructuring once imported it with every `inspect`."""
    probe = ("import sys\nfrom relaunchd.cli import main\n"
             "rc = main(sys.argv[1:])\n"
             "print('CRYPTO', 'cryptography' in sys.modules, rc, file=sys.stderr)\n")

    def imported(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", probe, "inspect", "--json", *args],
                              capture_output=True, text=True, timeout=120)
        return done.stderr.strip().splitlines()[-1]

    assert imported("--bank", "sha256", str(real_ukis["minimal"])) == "CRYPTO False 0"
    assert imported(str(real_ukis["signed"])) == "CRYPTO True 0"
