"""Journal MESSAGE_IDs (relaunchd.engine.journal_ids): 128-bit ids as sd-id128 prints them
(32 lowercase hex digits, sd_id128_to_string), one per event, each listed in
docs/dbus-api.md so a fleet can find them with `journalctl MESSAGE_ID=…`."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from relaunchd.engine.journal_ids import MESSAGE_IDS

DOCS = Path(__file__).resolve().parents[3] / "docs" / "dbus-api.md"


def test_ids_are_sd_id128_strings_and_distinct():
    for what, ident in MESSAGE_IDS.items():
        assert re.fullmatch(r"[0-9a-f]{32}", ident), what
        assert uuid.UUID(hex=ident).hex == ident
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


def test_every_id_is_documented():
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `([0-9a-f]{32})` \|", text, re.M))
    assert documented == set(MESSAGE_IDS.values())


def test_the_events_the_daemon_and_the_proof_log():
    assert set(MESSAGE_IDS) == {"staging", "staged", "relaunch", "failure", "verified",
                                "unverified"}
