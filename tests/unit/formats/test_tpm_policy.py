"""TPM 2.0 policy arguments out of range are InvalidArgument; PolicyPCR's selection is
ordered by the bitmap, not as given. The digests themselves are checked against
tpm2_createpolicy and the TPM in tests/integration/test_sealed_volumes.py."""

from __future__ import annotations

import pytest

from relaunchd.errors import InvalidArgument
from relaunchd.formats import tpm_policy


@pytest.mark.parametrize("call", [
    lambda: tpm_policy.PcrSelection("sha256", (24,)),
    lambda: tpm_policy.PcrSelection("sha256", (7, 7)),
    lambda: tpm_policy.PcrSelection("md5", (7,)),
    lambda: tpm_policy.policy_pcr(bytes(31), [tpm_policy.PcrSelection("sha256", (7,))],
                                  {"sha256": {7: bytes(32)}}),
    lambda: tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7,))],
                                  {"sha256": {7: bytes(20)}}),
    lambda: tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7,))], {}),
    lambda: tpm_policy.extended("sha1", bytes(32), bytes(32)),
    lambda: tpm_policy.rsa_signing_key_name(b"", 65537),
])
def test_policy_arguments_out_of_range(call):
    with pytest.raises(InvalidArgument):
        call()


def test_policy_pcr_selection_is_ordered_by_the_bitmap():
    values = {"sha256": {0: bytes(32), 7: b"\x07" * 32}}
    a = tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (7, 0))], values)
    b = tpm_policy.policy_pcr(bytes(32), [tpm_policy.PcrSelection("sha256", (0, 7))], values)
    assert a == b
