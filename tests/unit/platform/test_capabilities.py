"""The quiesce plan's holder scan when it may not look into other processes (issue #14,
item 5): every process whose open files it cannot read is counted, and the plan says
"could not inspect N processes: missing CAP_…" — never a silent "no holders".

The refusals are the kernel's own: the scans run in a child process whose capabilities
`setpriv` dropped (root without CAP_DAC_READ_SEARCH cannot list a 0500 fd directory of
another uid; without CAP_SYS_PTRACE it cannot read the fd links of a process with more
capabilities than itself), over a fixture /proc and over the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relaunchd.platform.capabilities import effective
from relaunchd.platform.quiesce import scan_holders
from relaunchd.platform.sysroot import SysRoot

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setpriv)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

PACKAGE = Path(__file__).resolve().parents[3] / "daemon"
NOBODY = 65534
SCAN = """
import json, sys
from relaunchd.platform.quiesce import scan_holders
from relaunchd.platform.sysroot import SysRoot
scan = scan_holders(SysRoot(sys.argv[1]), set(), exclude={int(p) for p in sys.argv[2:]})
print(json.dumps({"holders": [[h.pid, h.comm, h.path] for h in scan.holders],
                  "uninspected": scan.uninspected, "notes": list(scan.notes)}))
"""


def scan_with_capabilities(root: Path, caps: str, exclude: tuple[int, ...] = ()) -> dict:
    """scan_holders in a child whose bounding (so effective) set is `caps` ("-all" or
    "-all,+dac_read_search")."""
    cmd = ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all", "--",
           sys.executable, "-c", SCAN, str(root), *map(str, exclude)]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(PACKAGE)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def fixture_proc(tmp_path) -> Path:
    """pid 100 holds /dev/tpm0 (its fd directory is root's); pids 200 and 300 belong to
    nobody with the kernel's 0500 fd directories; pid 400 vanished mid-scan."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "dev/tpm0").write_text("")
    for pid, owner, comm in ((100, 0, "tpm2-abrmd"), (200, NOBODY, "holder"),
                             (300, NOBODY, "other")):
        fd = root / f"proc/{pid}/fd"
        fd.mkdir(parents=True)
        (fd / "3").symlink_to(root / "dev/tpm0")
        (root / f"proc/{pid}/comm").write_text(comm + "\n")
        os.lchown(fd / "3", owner, owner)
        os.chown(fd, owner, owner)
        fd.chmod(0o500)
    (root / "proc/400").mkdir()
    return root


def test_full_capabilities_see_every_holder(fixture_proc):
    scan = scan_holders(SysRoot(str(fixture_proc)), set(), exclude=set())
    assert scan.uninspected == 0 and scan.notes == ()
    assert [h.pid for h in scan.holders] == [100, 200, 300]


def test_unreadable_fd_directories_are_counted_and_named(fixture_proc):
    scan = scan_with_capabilities(fixture_proc, "-all")
    assert scan["holders"] == [[100, "tpm2-abrmd", "/dev/tpm0"]]
    assert scan["uninspected"] == 2
    assert scan["notes"] == ["could not inspect 2 processes: missing CAP_SYS_PTRACE and "
                             "CAP_DAC_READ_SEARCH"]


def test_with_dac_read_search_the_fixture_is_readable(fixture_proc):
    scan = scan_with_capabilities(fixture_proc, "-all,+dac_read_search")
    assert [h[0] for h in scan["holders"]] == [100, 200, 300]
    assert scan["uninspected"] == 0 and scan["notes"] == []


def test_real_processes_need_cap_sys_ptrace(tmp_path):
    """The issue's case on the real /proc: a root process with every capability holds
    /dev/tpm0; a scanner without CAP_SYS_PTRACE may list its fds but not read them, and
    must say so instead of reporting no holder."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "dev/tpm0").write_text("")
    (root / "proc").symlink_to("/proc")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); "
                               "print('ready', flush=True); sys.stdin.read()",
                               str(root / "dev/tpm0")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        full = scan_holders(SysRoot(str(root)), set(), exclude={os.getpid()})
        assert [h.path for h in full.holders if h.pid == holder.pid] == ["/dev/tpm0"]
        limited = scan_with_capabilities(root, "-all,+dac_read_search")
        assert all(h[0] != holder.pid for h in limited["holders"])
        assert limited["uninspected"] >= 1          # at least our holder, likely many more
        note = limited["notes"][-1]
        assert note.startswith(f"could not inspect {limited['uninspected']} process")
        assert note.endswith(": missing CAP_SYS_PTRACE")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("status", "mask"), [
    ("Name:\tx\nCapEff:\t0000000000080004\n", (1 << 19) | (1 << 2)),
    ("CapEff:\tzz\n", None), ("Name:\tx\n", None)])
def test_effective_mask_from_status(status, mask):
    assert effective(status) == mask
