"""systemd-tpm2 tokens (systemd 252 field names) with the right and the wrong field types;
each wrong one is InvalidVolume naming the field. Tokens written by systemd-cryptenroll and
clevis are read in tests/integration/test_sealed_volumes.py."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidVolume
from relaunchd.formats import luks2, luks_tokens
from support.luks2_header import EMPTY, make_header

TOKEN = {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7],
         "tpm2-pcr-bank": "sha256", "tpm2-policy-hash": "00" * 32, "tpm2-pin": False,
         # TPM2B_PRIVATE (empty) || TPM2B_PUBLIC: type, nameAlg, attrs, authPolicy.
         "tpm2-blob": "AAAAKgAIAAsAAAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="}


def test_systemd_token_fields():
    sealing = luks_tokens.systemd_token(0, TOKEN)
    assert (sealing.pcrs, sealing.bank, sealing.keyslots, sealing.pin) == ((7,), "sha256",
                                                                           (1,), False)


@pytest.mark.parametrize("change, match", [
    ({"tpm2-pcrs": [24]}, "not a PCR number"),
    ({"tpm2-pcrs": [True]}, "not a PCR number"),
    ({"tpm2-pcrs": "7"}, "not a list"),
    ({"tpm2-pcr-bank": "md5"}, "unknown"),
    ({"tpm2-policy-hash": "zz"}, "not hex"),
    ({"tpm2-policy-hash": "11" * 32}, "not the sealed object's policy"),
    ({"tpm2-pin": "yes"}, "not a boolean"),
    ({"tpm2_pubkey_pcrs": [11]}, "without tpm2_pubkey"),
    ({"tpm2-blob": "AA=="}, "truncated"),
    ({"tpm2-blob": "***"}, "not base64"),
    ({"keyslots": [1]}, "decimal strings"),
])
def test_systemd_token_bad_fields(change, match):
    with pytest.raises(InvalidVolume, match=match):
        luks_tokens.systemd_token(0, {**TOKEN, **change})


def test_tokens_of_other_types_are_not_tpm_sealings():
    header = luks2.parse_copy(make_header({**EMPTY, "tokens": {
        "3": {"type": "other", "keyslots": ["0"]}}}), 0)
    assert luks_tokens.tpm_sealings(header) == []
