"""The kernel command line systemd-stub would pass, plus relaunchd's own marker
(formats layer).

Rules (uki.md §5.2, systemd-stub(7)): a custom command line is used unless
Secure Boot is on and the UKI has a `.cmdline` (then it is dropped); without an
accepted custom one, `.cmdline` is used; the result is mangled (control
characters → spaces, outer whitespace trimmed); add-on command lines follow,
each mangled, joined by single spaces. relaunchd appends `relaunchd.id=<uuid>`
so the next boot can prove it is the staged one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relaunchd.errors import InvalidArgument
from relaunchd.formats.uki import mangle_cmdline

# kexec_file_load's x86 bzImage loader needs cmdline_len + this many bytes to
# fit in the setup header's cmdline_size (uki.md §4.1).
KEXEC_FILE_X86_RESERVE = 30


@dataclass(frozen=True)
class Cmdline:
    text: str
    custom_dropped: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def nul_terminated(self) -> bytes:
        return self.text.encode() + b"\0"


def addon_tail(addons: list[str]) -> str:
    """The add-on command lines as the stub appends them (stub.c load_addons, then
    cmdline_append_and_measure_addons): each mangled and added with one space unless
    nothing came before, the whole mangled again. An add-on whose line mangles to
    nothing still adds its space: "a", "", "b" give "a  b", as in the stub."""
    joined = ""
    for text in addons:
        joined = f"{joined}{' ' if joined else ''}{mangle_cmdline(text)}"
    return mangle_cmdline(joined)


def compose(uki_cmdline: str | None, *, custom: str | None = None, secure_boot: bool = False,
            addons: list[str] | None = None, extra: list[str] | None = None,
            limit: int | None = None) -> Cmdline:
    """`limit`: the most bytes (without the NUL) the loader can pass."""
    notes: list[str] = []
    dropped = False
    text = uki_cmdline or ""
    if custom is not None:
        if secure_boot and uki_cmdline is not None:
            dropped = True
            notes.append("Secure Boot is on and the UKI has a .cmdline: the custom command "
                         "line is dropped, as systemd-stub would")
        else:
            text = custom
    pieces = [mangle_cmdline(text), addon_tail(addons or [])]
    pieces += [mangle_cmdline(e) for e in extra or []]
    final = " ".join(p for p in pieces if p)
    if any(ord(c) > 0x7E for c in final):
        notes.append("command line contains non-ASCII characters")
    if limit is not None and len(final.encode()) > limit:
        raise InvalidArgument(
            f"kernel command line is {len(final.encode())} bytes; this kernel takes at most "
            f"{limit}")
    return Cmdline(text=final, custom_dropped=dropped, notes=notes)
