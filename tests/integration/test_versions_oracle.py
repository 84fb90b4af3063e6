"""formats.versions against systemd 252's own strverscmp_improved.

`systemd-analyze compare-versions A B` (added in 252) runs strverscmp_improved and
exits 12 (A older), 0 (equal) or 11 (A newer); its source is
src/analyze/analyze-compare-versions.c. systemd-boot and bootctl order boot entries
with the same function (src/fundamental/string-util-fundamental.c is shared).
"""

from __future__ import annotations

import itertools
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st

from relaunchd.formats import versions
from support import tools

EXIT_VERDICT = {12: -1, 0: 0, 11: 1}


def systemd_compare(a: str, b: str) -> int:
    proc = subprocess.run(["systemd-analyze", "compare-versions", "--", a, b],
                          capture_output=True, timeout=30)
    assert proc.returncode in EXIT_VERDICT, proc.stderr
    return EXIT_VERDICT[proc.returncode]


# Every kind of segment and prefix, and the characters that are dropped.
TOKENS = ["", "1", "01", "10", "1.0", "1_0", "1~", "~1", "1-", "1^", "1.", "a", "A", "1a",
          "1.a", "1-a", "a1", "~", "-", "^", ".", "1--2", "00", "1.01", "2.6.32-rc1",
          "2.6.32~rc1", "x_y", "é1", "6.1.0-13-amd64", "6.1.0+3", "1^~"]


def test_token_pairs_agree_with_systemd_analyze():
    tools.require("systemd-analyze")
    mismatches = [(a, b) for a, b in itertools.product(TOKENS, TOKENS)
                  if versions.compare(a, b) != systemd_compare(a, b)]
    assert mismatches == []


@settings(max_examples=250, deadline=None)
@given(st.text(alphabet="0123456789azAZ.-~^_+:é", max_size=14),
       st.text(alphabet="0123456789azAZ.-~^_+:é", max_size=14))
def test_random_versions_agree_with_systemd_analyze(a, b):
    assert versions.compare(a, b) == systemd_compare(a, b)
