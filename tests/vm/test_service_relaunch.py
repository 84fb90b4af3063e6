"""The relaunch itself, end to end in the guest, through the installed service.

An update tool stages and relaunches over D-Bus (busctl: no relaunchd code on the client
side); the system-shutdown hook quiesces (CPU 1 offline, the virtio-rng device unbound)
right before the kexec; the daemon of the new boot proves the outcome (boot id, command
line with relaunchd.id, measurement log against PCR 23) and publishes it as
LastRelaunch, in the journal and in the Prometheus textfile. Then what can go wrong:
a rehearsal and a fault-injected rollback, SIGKILL between Relaunch and the hand-off, a
kernel that does not come up (the guest falls back through firmware), `--immediate`
(the daemon quiesces and kexecs itself), kured's documented reboot command with nothing
staged (relaunchd's own fallback to a firmware reboot), a tampered log.

Runs after test_service (file order) and before test_stage, which locks the guest down.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from relaunchd.engine.journal_ids import MESSAGE_IDS

from .guestsetup import BUS, CONFIG, IMAGES, PROM, configure, rng_address
from .guestuki import guest_uki

KEXEC_TIMEOUT = 600
REPO = Path(__file__).resolve().parents[2]
CERT = "/etc/relaunchd/test-db.pem"
LOG = "/var/lib/relaunchd/measurements.log"
DROPIN = "/run/systemd/system/relaunchd.service.d/fault.conf"

# PCR 23 as the log says it should be: tpm2_eventlog (tpm2-tools) replays it.
REPLAY = """
import subprocess, sys, yaml
out = subprocess.run(["tpm2_eventlog", sys.argv[1]], capture_output=True, text=True,
                     check=True).stdout
print(format(int(yaml.safe_load(out)["pcrs"]["sha256"][23]), "064x"))
"""

# A new boot that never reaches userspace: PID 1 exits, the kernel panics and (panic=1)
# resets the machine; SeaBIOS boots the guest's normal kernel again.
FAILING_INIT = b"#!/bin/sh\necho rld-failing-kernel: giving up\nexit 1\n"


def detached(command: str) -> str:
    """Run a relaunch request outside the agent: the shutdown it starts may kill the
    agent before a blocking request returns (as it would kill any update tool)."""
    # The redirections belong to setsid: the agent waits for EOF on its own pipe.
    return f'setsid -f sh -c "{command}" >/run/rld-request.out 2>&1 </dev/null'


def going_down(result, relaunch_id: str) -> bool:
    """`relaunchctl relaunch --wait`'s contract as the system goes down: exit 0, one line."""
    return result.rc == 0 and result.output == (
        f"relaunch {relaunch_id}: the system is going down\n")


def status(guest) -> dict:
    return json.loads(guest.run("relaunchctl status --json").output)


def pcr23(guest) -> str:
    return guest.run("tpm2_pcrread -Q -o /dev/stdout sha256:23 | od -An -tx1 -v | "
                     "tr -d ' \\n'").output.strip()


def log_replays(guest) -> bool:
    expected = guest.run(f"python3 -c '{REPLAY}' {LOG}").output.strip()
    return expected == pcr23(guest)


def cpu1_online(guest) -> bool:
    return guest.run("cat /sys/devices/system/cpu/cpu1/online").output.strip() == "1"


def rng_driver(guest, address: str) -> str:
    return guest.run(f"basename $(readlink /sys/bus/pci/devices/{address}/driver) "
                     "2>/dev/null || echo none", check=False).output.strip()


@pytest.fixture(scope="module")
def service(guest, keys):
    """relaunchd configured to quiesce CPU 1 and the virtio-rng device, with metrics."""
    rng = rng_address(guest)
    configure(guest, cert=keys["db"].cert, cert_path=CERT,
              written_by="tests/vm/test_service_relaunch.py", unbind=(rng,))
    assert rng_driver(guest, rng) == "virtio-pci" and cpu1_online(guest)
    guest.rng = rng
    yield guest
    guest.run(f"rm -f {CONFIG}", check=False)


def put_uki(guest, vm_image, keys, tmp_path: Path, name: str, **kw) -> tuple[str, str]:
    marker = f"rld.{name}={uuid.uuid4().hex[:12]}"
    guest.put(f"{IMAGES}/{name}.efi", guest_uki(vm_image, keys, tmp_path, marker, name, **kw))
    return f"{IMAGES}/{name}.efi", marker


def test_update_tool_relaunch_is_proven(service, vm_image, keys, tmp_path, vm_timings):
    guest = service
    path, marker = put_uki(guest, vm_image, keys, tmp_path, "next")
    relaunch_id = guest.run(f"rld-update {path}", timeout=300).output.strip()
    props = status(guest)
    assert props["State"] == "staged" and props["CanRelaunch"] == "yes"
    assert props["StagedImage"]["id"] == relaunch_id
    assert "relaunchd_staged 1" in guest.run(f"cat {PROM}").output
    old_boot = guest.boot_id()

    boot = guest.transition(detached(f"busctl call {BUS} Relaunch 'a{{sv}}' 0"),
                            timeout=KEXEC_TIMEOUT)
    vm_timings.add("relaunchd_relaunch_to_ready", boot.seconds)
    assert boot.boot_id != old_boot
    # The shutdown hook quiesced, right before the kexec, exactly per the plan.
    hook = guest.console_time(f"relaunchd-shutdown: relaunch {relaunch_id}: quiesced",
                              boot.since)
    assert hook, guest.console_tail()
    line = next(text for t, text in guest.console if t == hook)
    assert "cpu-offline 1" in line and f"driver-unbind {guest.rng}" in line, line

    props = status(guest)
    last = props["LastRelaunch"]
    assert last["id"] == relaunch_id and last["verified"] is True, last
    assert last["measured"] is True, json.dumps(last["measurement"])
    assert last["mismatches"] == [] and last["drtm"] is False
    assert last["previous_boot_id"] == old_boot and last["boot_id"] == boot.boot_id
    assert 0 < last["downtime_ms"] < boot.seconds * 1000 + 5000
    vm_timings.add("relaunchd_reported_downtime", last["downtime_ms"] / 1000)
    cmdline = guest.run("cat /proc/cmdline").output.split()
    assert f"relaunchd.id={relaunch_id}" in cmdline and marker in cmdline
    assert props["State"] == "idle"
    # The log is what a verifier replays: tpm2_eventlog agrees with the TPM.
    assert log_replays(guest)
    prom = guest.run(f"cat {PROM}").output
    assert "relaunchd_last_relaunch_verified 1" in prom and "relaunchd_staged 0" in prom
    assert f'id="{relaunch_id}"' in prom
    # A BIOS guest: the firmware time is unknown (null, left out over D-Bus), saved 0 s.
    assert last["firmware_time"]["source"] == "unknown", last["firmware_time"]
    assert "avoided_usec" not in last["firmware_time"] and last["firmware_time"]["reason"]
    assert "relaunchd_firmware_seconds_saved_total 0\n" in prom
    journal = guest.run(f"journalctl -b -o cat MESSAGE_ID={MESSAGE_IDS['verified']}").output
    assert f"relaunch {relaunch_id} verified" in journal
    assert cpu1_online(guest) and rng_driver(guest, guest.rng) == "virtio-pci"


def test_rehearsal_and_a_fault_injected_rollback(service, vm_image, keys, tmp_path):
    guest = service
    path, _ = put_uki(guest, vm_image, keys, tmp_path, "rehearse")
    guest.run(f"relaunchctl stage {path}", timeout=300)
    report = json.loads(guest.run("relaunchctl relaunch --rehearse --json").output)
    assert report["ok"] is True, report
    assert [(e["action"], e["target"]) for e in report["executed"]] == [
        ("cpu-offline", "1"), ("driver-unbind", guest.rng)]
    assert cpu1_online(guest) and rng_driver(guest, guest.rng) == "virtio-pci"

    # The second store (the unbind) happens and then reports failure: the rollback must
    # rebind the device and bring CPU 1 back.
    guest.run(f"mkdir -p {Path(DROPIN).parent} && printf '[Service]\\n"
              f"Environment=RELAUNCHD_TEST_FAIL_STORE=2:after\\n' > {DROPIN} && "
              "systemctl daemon-reload && systemctl restart relaunchd")
    try:
        assert status(guest)["State"] == "staged"      # reconciled after the restart
        failed = guest.run("relaunchctl relaunch --rehearse", check=False)
        assert failed.rc == 1 and "QuiesceFailed" in failed.output, failed.output
        assert "rolled back" in failed.output, failed.output
        assert cpu1_online(guest) and rng_driver(guest, guest.rng) == "virtio-pci"
        props = status(guest)
        assert props["State"] == "staged" and props["LastError"]["name"] == "QuiesceFailed"
    finally:
        guest.run(f"rm -f {DROPIN} && systemctl daemon-reload && systemctl restart relaunchd")
    guest.run("relaunchctl cancel")


def test_sigkill_between_relaunch_and_handoff(service, vm_image, keys, tmp_path):
    """The daemon dies after measuring and writing the pending record, before systemd
    got the request: the restarted daemon says so, the image stays staged, and the
    measurement log still replays to PCR 23."""
    guest = service
    path, _ = put_uki(guest, vm_image, keys, tmp_path, "killed")
    relaunch_id = guest.run(f"rld-update {path}", timeout=300).output.strip()
    # The hand-off runs `systemctl` from PATH: a slow one (for kexec.target only; others
    # call systemctl too) opens the window to kill in.
    guest.put("/usr/local/bin/systemctl",
              b'#!/bin/sh\ncase "$*" in *kexec.target*) ;; *) exec /usr/bin/systemctl "$@";; esac\n'
              b"touch /run/relaunchd/handoff-reached\nexec sleep 120\n",
              mode=0o755)
    try:
        # Detached: a plain `setsid -f sh -c '...'` keeps the agent's pipe open until
        # relaunchctl gives up (60 s), and by then the hand-off has timed out too.
        guest.run(detached("relaunchctl relaunch"))
        guest.run("for i in $(seq 300); do [ -e /run/relaunchd/handoff-reached ] && exit 0; "
                  "sleep 0.2; done; exit 1", timeout=90)
        assert guest.run("test -s /var/lib/relaunchd/pending.json", check=False).ok, \
            guest.run("cat /run/rld-request.out; journalctl -u relaunchd -n 40 --no-pager",
                      check=False).output
        guest.run("systemctl kill -s KILL relaunchd")
    finally:
        guest.run("rm -f /usr/local/bin/systemctl /run/relaunchd/handoff-reached")
    guest.run("for i in $(seq 150); do systemctl is-active -q relaunchd && exit 0; "
              "sleep 0.2; done; exit 1", timeout=60)
    props = status(guest)
    assert props["State"] == "staged" and props["StagedImage"]["id"] == relaunch_id
    assert props["LastError"]["name"] == "RelaunchAborted", props["LastError"]
    assert relaunch_id in props["LastError"]["message"]
    history = json.loads(guest.run("relaunchctl history --json").output)
    assert any(e["event"] == "relaunch-aborted" and e["id"] == relaunch_id for e in history)
    assert not guest.run("test -e /var/lib/relaunchd/pending.json", check=False).ok
    assert guest.run("cat /sys/kernel/kexec_loaded").output.strip() == "1"
    assert log_replays(guest)
    guest.run("relaunchctl cancel")


def test_immediate_relaunch_quiesces_in_the_daemon_and_is_proven(service, vm_image, keys,
                                                                  tmp_path, vm_timings):
    """`relaunch --immediate` (initramfs/VM use): the daemon quiesces itself, syncs and
    kexecs at once, services still running; the next boot proves it like any other."""
    guest = service
    path, marker = put_uki(guest, vm_image, keys, tmp_path, "immediate")
    relaunch_id = guest.run(f"rld-update {path}", timeout=300).output.strip()
    old_boot = guest.boot_id()
    boot = guest.transition(detached("relaunchctl relaunch --immediate"),
                            timeout=KEXEC_TIMEOUT)
    vm_timings.add("relaunchd_immediate_to_ready", boot.seconds)
    assert boot.boot_id != old_boot
    # systemd never went down: no shutdown hook ran, no unit was stopped.
    assert guest.console_time("relaunchd-shutdown:", boot.since) is None
    assert guest.console_time("Stopping relaunchd.service", boot.since) is None
    last = status(guest)["LastRelaunch"]
    assert last["id"] == relaunch_id and last["handoff"] == "immediate", last
    assert last["verified"] is True and last["measured"] is True, last["mismatches"]
    assert marker in guest.run("cat /proc/cmdline").output.split()
    assert log_replays(guest)
    assert cpu1_online(guest) and rng_driver(guest, guest.rng) == "virtio-pci"


def test_kernel_that_fails_to_boot_is_reported_unverified(service, vm_image, keys, tmp_path,
                                                          vm_timings):
    guest = service
    path, _ = put_uki(guest, vm_image, keys, tmp_path, "broken", rdinit=FAILING_INIT,
                      extra_cmdline="panic=1")
    relaunch_id = guest.run(f"rld-update {path}", timeout=300).output.strip()
    # Attached, in a scope the shutdown stops, as an SSH session or a kured pod is: the
    # caller gets SIGTERM in whatever order relaunchd leaves the bus; the contract is
    # still exit 0 with the going-down line.
    result, boot = guest.transition_attached(
        "systemd-run --quiet --scope relaunchctl relaunch --wait", timeout=KEXEC_TIMEOUT)
    assert going_down(result, relaunch_id), result
    vm_timings.add("relaunch_failed_kernel_to_ready", boot.seconds)
    assert guest.console_time("rld-failing-kernel: giving up", boot.since), \
        guest.console_tail()
    last = status(guest)["LastRelaunch"]
    assert last["id"] == relaunch_id and last["verified"] is False, last
    joined = "\n".join(last["mismatches"])
    assert "/proc/cmdline is" in joined and "the TPM was reset since the hand-off" in joined
    assert "relaunchd_last_relaunch_verified 0" in guest.run(f"cat {PROM}").output
    journal = guest.run(f"journalctl -b -o cat MESSAGE_ID={MESSAGE_IDS['unverified']}").output
    assert f"relaunch {relaunch_id} NOT VERIFIED" in journal


def kured_reboot_command() -> str:
    """The command docs/fleet.md's kured snippet names (the DaemonSet's container args)."""
    text = (REPO / "docs" / "fleet.md").read_text()
    section = text[text.index("## kured"):]
    args = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert "--reboot-method=command" in args, args
    [command] = [a.split("=", 1)[1] for a in args if a.startswith("--reboot-command=")]
    return command


def test_kured_reboot_command_reboots_through_firmware_when_nothing_is_staged(service,
                                                                              vm_timings):
    """kured's contract, with the command exactly as documented: nothing is staged, so
    relaunchd says why, records it and reboots through firmware; the caller — attached, in
    a scope the shutdown stops, as kured's pod is — exits 0 with its one line, and the new
    boot reports a fallback, never a verified relaunch."""
    guest = service
    command = kured_reboot_command()
    assert command == "/usr/bin/relaunchctl relaunch --wait --fallback reboot"
    guest.run("relaunchctl cancel", check=False)
    assert not status(guest)["StagedImage"]          # nothing staged: nothing to relaunch
    result, boot = guest.transition_attached(f"systemd-run --quiet --scope {command}",
                                             timeout=KEXEC_TIMEOUT)
    vm_timings.add("kured_fallback_reboot_to_ready", boot.seconds)
    match = re.fullmatch(r"relaunch (\S+): the system is going down\n", result.output)
    assert result.rc == 0 and match, result
    last = status(guest)["LastRelaunch"]
    assert last["id"] == match.group(1), last
    assert (last["method"], last["handoff"], last["verified"]) == (
        "firmware-reboot", "reboot", False), last
    assert last["fallback"]["reason"].startswith("NotStaged"), last
    assert last["firmware_time"]["avoided_usec"] == 0, last    # it went through firmware
    events = json.loads(guest.run("relaunchctl history --json").output)
    assert any(e["event"] == "relaunch-fallback" and e["id"] == last["id"] for e in events)


def test_tampered_log_is_detected_after_relaunch(service, vm_image, keys, tmp_path):
    """The new boot starts without relaunchd (systemd.mask on the staged command line);
    the log is altered before relaunchd runs and proves the relaunch. Leaves relaunchd
    masked in this boot: the last test of the file."""
    guest = service
    path, _ = put_uki(guest, vm_image, keys, tmp_path, "tamper",
                      extra_cmdline="systemd.mask=relaunchd.service")
    relaunch_id = guest.run(f"rld-update {path}", timeout=300).output.strip()
    result, _ = guest.transition_attached("relaunchctl relaunch --wait", timeout=KEXEC_TIMEOUT)
    assert going_down(result, relaunch_id), result
    assert guest.run("systemctl is-active relaunchd", check=False).output.strip() != "active"
    assert guest.run("test -s /var/lib/relaunchd/pending.json", check=False).ok
    # Flip one bit of the last record's sha256 digest (the cmdline's).
    guest.run("python3 - <<'EOF'\n"
              f"data = bytearray(open('{LOG}', 'rb').read())\n"
              "# ... | u16 alg | 32-byte digest | u32 eventSize | event data\n"
              "pos = data.rfind(b'relaunchd:cmdline')\n"
              "data[pos - 4 - 32] ^= 1\n"
              f"open('{LOG}', 'wb').write(bytes(data))\n"
              "EOF")
    guest.run("systemd-run --unit=rld-verify --property=Type=notify /usr/bin/relaunchd")
    try:
        last = status(guest)["LastRelaunch"]
        assert last["id"] == relaunch_id and last["verified"] is False, last
        assert last["cmdline_matches"] is True          # it *is* the staged image...
        assert any("PCR 23 sha256" in m for m in last["mismatches"]), last["mismatches"]
    finally:
        guest.run("systemctl stop rld-verify", check=False)
