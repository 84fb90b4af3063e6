"""Version comparison as systemd does it: `strverscmp_improved` (formats layer).

systemd-boot and bootctl order boot entries with it (newest first), and
`systemd-analyze compare-versions A B` prints its verdict, which the tests use as
the oracle. Rules (systemd 252, src/fundamental/string-util-fundamental.c, the
comment above strverscmp_improved; unchanged in later releases as far as read):

- Only ASCII letters, digits and `~ - ^ .` count; anything else (`_`, `+`, `:`,
  non-ASCII) ends a segment and is otherwise dropped: `123_a` equals `123a`, while
  `1_2` (segments 1, 2) is older than `12`.
- A segment is a run of digits or a run of letters, optionally prefixed by one of
  `~` (pre-release: older than anything, even the end of the string),
  `-` (version/release separator: older than `^`, `.` or a plain segment),
  `^` (patched release: newer than `-`, older than `.` or plain) and
  `.` (point release: older than a plain segment, i.e. `123a` > `123.a`).
- Numbers compare by value (leading zeros dropped, `007` == `7`), letters by
  ASCII; a number is newer than letters; the longer of two letter runs that agree
  on their common prefix is newer.
- When one string ends (after `~` handling), the one with more left is newer.

Everything works on `str`; characters outside ASCII are separators, exactly as the
UTF-8 bytes (bootctl) and UTF-16 code units (systemd-boot) of them are.
"""

from __future__ import annotations

_PREFIXES = "-^."   # checked in this order after '~', as systemd does


def _valid(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "~-^.")


def _digits_end(s: str, i: int) -> int:
    while i < len(s) and s[i].isascii() and s[i].isdigit():
        i += 1
    return i


def _letters_end(s: str, i: int) -> int:
    while i < len(s) and s[i].isascii() and s[i].isalpha():
        i += 1
    return i


def _cmp(x: int | str | bool, y: int | str | bool) -> int:
    return (x > y) - (x < y)


def compare(a: str | None, b: str | None) -> int:
    """-1 if `a` is older than `b`, 1 if newer, 0 if equivalent (None is "")."""
    a = a or ""
    b = b or ""
    i = j = 0
    while True:
        while i < len(a) and not _valid(a[i]):
            i += 1
        while j < len(b) and not _valid(b[j]):
            j += 1
        ca = a[i] if i < len(a) else ""
        cb = b[j] if j < len(b) else ""

        # '~': a pre-release is older than anything, even than the end of the string.
        if ca == "~" or cb == "~":
            r = _cmp(ca != "~", cb != "~")
            if r:
                return r
            i, j = i + 1, j + 1
            ca = a[i] if i < len(a) else ""
            cb = b[j] if j < len(b) else ""

        # One string has ended: the one with more segments is newer.
        if not ca or not cb:
            return _cmp(ca, cb)

        for prefix in _PREFIXES:
            if ca == prefix or cb == prefix:
                r = _cmp(ca != prefix, cb != prefix)
                if r:
                    return r
                i, j = i + 1, j + 1
                ca = a[i] if i < len(a) else ""
                cb = b[j] if j < len(b) else ""

        if (ca.isascii() and ca.isdigit()) or (cb.isascii() and cb.isdigit()):
            ea, eb = _digits_end(a, i), _digits_end(b, j)
            # A number is newer than no number (letters, or nothing).
            r = _cmp(ea != i, eb != j)
            if r:
                return r
            na, nb = a[i:ea].lstrip("0"), b[j:eb].lstrip("0")
            r = _cmp(len(na), len(nb)) or _cmp(na, nb)
            if r:
                return r
        else:
            ea, eb = _letters_end(a, i), _letters_end(b, j)
            la, lb = a[i:ea], b[j:eb]
            common = min(len(la), len(lb))
            r = _cmp(la[:common], lb[:common]) or _cmp(len(la), len(lb))
            if r:
                return r
        i, j = ea, eb
