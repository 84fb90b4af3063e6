"""Boot entry order and default against bootctl 252 on the fixture trees.

bootctl (src/shared/bootspec.c) mirrors systemd-boot's ordering, with known
differences this module models explicitly rather than hides:
- bootctl's ids keep their case and lose the boot counter (`Fedora+3.conf` →
  `Fedora.conf`); the loader's are lower-cased and keep it. Orders are compared on
  bootctl's ids, and where the id difference changes the order the fixture says so.
- bootctl lists entries the loader does not (kernel missing, no kernel, another
  architecture, `auto-*`, a UKI for another machine): those must be exactly the
  entries relaunchd marks as not listed, for those reasons.
- Under `--root` bootctl reads no EFI variables, so its default is loader.conf's
  pattern or the first entry: compared with relaunchd's choice from loader.conf alone.
"""

from __future__ import annotations

import pytest

from relaunchd.formats import boot_entries as fmt
from relaunchd.platform import boot_entries
from relaunchd.platform.sysroot import SysRoot
from support import bootfixtures
from support.bootctl import bootctl_list

# The reasons systemd-boot drops an entry that bootctl 252 still lists.
BOOTCTL_STILL_LISTS = {fmt.NO_KERNEL, fmt.KERNEL_MISSING, fmt.FOREIGN_ARCHITECTURE,
                       fmt.UKI_KEY_UNSUPPORTED, fmt.RESERVED_NAME}
# Field-by-field comparison is skipped where the fixture is about differences.
FIELD_CHECKS_SKIPPED = {"differences", "malformed"}

CASES = [(name, i) for name in bootfixtures.scenarios()
         for i, _ in enumerate(bootfixtures.scenario(name)["cases"])]


def bootctl_id(entry: fmt.BootEntry) -> str:
    """The id bootctl 252 gives the same file (boot_filename_extract_tries)."""
    if entry.counter is None:
        return entry.file_name
    return entry.counter.stem + "." + entry.file_name.rsplit(".", 1)[1]


@pytest.mark.parametrize(("name", "index"), CASES,
                         ids=[f"{n}-{i}" for n, i in CASES])
def test_order_and_default_agree_with_bootctl(name, index, tmp_path):
    case = bootfixtures.scenario(name)["cases"][index]
    machine = bootfixtures.materialize(name, tmp_path / "root", case)
    listing = boot_entries.list_entries(SysRoot(str(machine.root)), esp=machine.esp,
                                        xbootldr=machine.xbootldr)
    oracle = bootctl_list(machine.host(machine.esp),
                          machine.host(machine.xbootldr) if machine.xbootldr else None)

    ours = [e for e in listing.entries if e.position is not None]
    hidden = [e for e in listing.entries if e.position is None]
    theirs = [e["id"] for e in oracle.entries]
    assert len(set(theirs)) == len(theirs)

    # Every entry bootctl lists that we do not is one the loader drops for a reason
    # bootctl does not check, and the other way round.
    bootctl_only = {i for i in theirs if i not in {bootctl_id(e.entry) for e in ours}}
    expected_only = {bootctl_id(e.entry) for e in hidden
                     if {p.reason for p in e.entry.problems} & BOOTCTL_STILL_LISTS}
    assert bootctl_only == expected_only

    common = [i for i in theirs if i not in bootctl_only]
    if "bootctl_order" in case:
        # The documented divergence: bootctl's order as derived by hand from its rules,
        # and ours different from it.
        assert common == case["bootctl_order"]
        assert common != [bootctl_id(e.entry) for e in ours]
    else:
        assert common == [bootctl_id(e.entry) for e in ours]

    # bootctl sees only loader.conf: compare with our choice from loader.conf alone.
    conf_only = fmt.LoaderSettings(default_pattern=listing.settings.default_pattern)
    choice = fmt.select([e.entry for e in ours], conf_only)
    expected_default = case.get("bootctl_default", bootctl_id(ours[choice.index].entry))
    assert oracle.default == expected_default
    if "bootctl_default" in case:
        assert case["bootctl_default"] != bootctl_id(ours[choice.index].entry)

    if name in FIELD_CHECKS_SKIPPED:
        return
    by_id = {e["id"]: e for e in oracle.entries}
    for listed in ours:
        entry, seen = listed.entry, by_id[bootctl_id(listed.entry)]
        assert seen.get("title") == entry.title
        assert seen.get("version") == entry.version
        assert seen.get("sortKey") == entry.sort_key
        assert seen.get("machineId") == entry.machine_id
        assert seen.get("options") == entry.options
        assert seen.get("triesLeft") == entry.tries_left
        if entry.type == fmt.TYPE1:
            assert seen.get("linux") == entry.kernel
            assert seen.get("initrd", []) == list(entry.initrd)
            # bootctl leaves tries done out when the name has no -DONE; the loader
            # counts it as 0.
            assert seen.get("triesDone", 0 if entry.counter else None) == entry.tries_done
        else:
            assert seen.get("linux") == entry.source.lstrip("/")
