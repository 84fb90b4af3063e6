"""formats.versions: systemd's strverscmp_improved (src/fundamental/string-util-fundamental.c,
systemd 252), the order systemd documents and its edge cases; checked against
`systemd-analyze compare-versions` in tests/integration/test_versions_oracle.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaunchd.formats import versions


def test_versions_in_the_order_systemd_documents():
    """The list in the comment above strverscmp_improved, oldest first."""
    order = ["122.1", "123~rc1-1", "123", "123-a", "123-a.1", "123-1", "123-1.1",
             "123^post1", "123.a-1", "123.1-1", "123a-1", "124-1"]
    for older, newer in itertools.pairwise(order):
        assert versions.compare(older, newer) == -1, (older, newer)
        assert versions.compare(newer, older) == 1, (newer, older)


@pytest.mark.parametrize(("a", "b", "verdict"), [
    ("00123", "123", 0),             # leading zeros do not count
    ("123_a", "123a", 0),            # unsupported characters only separate
    ("1_2", "12", -1),               # ... so 1_2 is two segments
    ("1.0", "1.0~", 1),              # ~ is older even than the end of the string
    ("6.1.0", "6.1.0-13", -1),       # more segments are newer
    ("6.1.a", "6.1.0", -1),          # a number is newer than letters
    ("abc", "abcde", -1),            # the longer letter run is newer
    ("ABC", "abc", -1),              # letters compare by ASCII
    ("", None, 0),
    ("x", "", 1),
])
def test_version_edge_cases(a, b, verdict):
    assert versions.compare(a, b) == verdict
    assert versions.compare(b, a) == -verdict


@given(st.text(alphabet="0123456789abAB.-~^_+", max_size=12),
       st.text(alphabet="0123456789abAB.-~^_+", max_size=12))
def test_version_comparison_is_antisymmetric(a, b):
    assert versions.compare(a, b) == -versions.compare(b, a)


