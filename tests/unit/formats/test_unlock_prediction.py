"""The relaunch model on synthetic sealings: what changes which verdict. The digests
themselves are proven against systemd-cryptenroll and tpm2_createpolicy in
tests/integration/test_sealed_volumes.py; here the sealing's policy_hash is computed
for the values it was "enrolled" with, and the model decides."""

from __future__ import annotations

import hashlib

from relaunchd.formats import tpm_policy, unlock_prediction
from relaunchd.formats.luks_tokens import TpmSealing
from relaunchd.formats.unlock_prediction import Extend, RelaunchModel

NOW = {pcr: hashlib.sha256(f"pcr{pcr}".encode()).digest() for pcr in range(24)}


def sealed(pcrs: tuple[int, ...], values: dict[int, bytes] = NOW, pin: bool = False
           ) -> TpmSealing:
    draft = TpmSealing(source="systemd-tpm2", token_id=0, keyslots=(1,), bank="sha256",
                       pcrs=pcrs, session_alg="sha256", policy_hash=b"", pin=pin)
    digest = unlock_prediction.policy_digest(draft, values)
    return TpmSealing(**{**draft.__dict__, "policy_hash": digest})


def assess(sealing: TpmSealing, model: RelaunchModel | None = None):
    return unlock_prediction.assess(sealing, {"sha256": NOW}, model or RelaunchModel())


def test_a_pcr_nothing_touches_unlocks_and_is_not_stale():
    verdict = assess(sealed((7,)))
    assert verdict.matches_now and verdict.unlocks_after_relaunch
    assert verdict.stale_pcrs == () and verdict.remedy is None


def test_boot_chain_pcrs_unlock_but_are_stale():
    verdict = assess(sealed((4, 7, 9)))
    assert verdict.unlocks_after_relaunch and verdict.stale_pcrs == (4, 9)
    assert "keep the old boot's values" in verdict.reason
    assert verdict.remedy == unlock_prediction.REMEDY_STALE


def test_a_known_extend_is_followed_exactly():
    word = hashlib.sha256(b"shutdown").digest()
    after = {**NOW, 11: tpm_policy.extended("sha256", NOW[11], word)}
    model = RelaunchModel(extends={11: [Extend("pcrphase shutdown", {"sha256": word})]})
    # Sealed to today's value: broken by the extend. Sealed to the predicted value
    # (as one would enrol for the next boot): holds, and is not stale (it moved).
    today, ahead = assess(sealed((11,)), model), assess(sealed((11,), after), model)
    assert not today.unlocks_after_relaunch and "pcrphase shutdown" in today.reason
    assert ahead.unlocks_after_relaunch and not ahead.matches_now and ahead.stale_pcrs == ()


def test_an_unknown_extend_or_a_drtm_reset_is_not_predictable():
    unknown = assess(sealed((23,)), RelaunchModel(extends={23: [Extend("relaunchd")]}))
    assert not unknown.unlocks_after_relaunch and "not predictable" in unknown.reason
    drtm = assess(sealed((17,)), RelaunchModel(resets=unlock_prediction.DRTM_RESET_PCRS))
    assert not drtm.unlocks_after_relaunch and "dynamic launch" in drtm.reason


def test_pin_changes_the_digest_and_is_mentioned():
    with_pin = sealed((7,), pin=True)
    assert with_pin.policy_hash != sealed((7,)).policy_hash
    verdict = assess(with_pin)
    assert verdict.unlocks_after_relaunch and "PIN" in verdict.reason


def test_a_policy_broken_already_says_so():
    enrolled = {**NOW, 15: bytes(32)}
    verdict = assess(sealed((7, 15), enrolled))
    assert not verdict.matches_now and not verdict.unlocks_after_relaunch
    assert "does not hold even now" in verdict.reason
    assert verdict.remedy == unlock_prediction.REMEDY_RE_ENROL
