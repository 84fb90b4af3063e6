r"""os-release / env-block parsing (os-release(5)), used for `.osrel` and `.profile`.

Lines are `KEY=value`; values may be quoted with '"' or "'" and use
backslash escapes for `\\ \" \' \$ \``; `#` starts a comment line; blank lines
are ignored. Invalid lines are skipped, as systemd's parser does.
"""

from __future__ import annotations

import re

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_env_block(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for raw in text.replace("\0", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            continue
        result[key] = _unquote(value.strip())
    return result


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    out: list[str] = []
    escaped = False
    for ch in value:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)
