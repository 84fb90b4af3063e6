"""Is the system going down? systemd's own answer (platform layer).

`relaunchctl relaunch --wait` must exit 0 when the system goes down, whichever
goes first: relaunchd leaving the bus, the bus itself, or the caller's own
SIGTERM (an SSH session or a kured pod is stopped by the same shutdown). None
of those alone proves a shutdown — relaunchd can crash or be restarted, a
caller can be killed by hand — so the client asks systemd.

systemd's SystemState is "stopping" as soon as a start job for shutdown.target
is queued (src/core/manager.c, manager_state()); kexec.target pulls it in
through systemd-kexec.service (Requires=shutdown.target), and relaunchd queues
that job before it answers Relaunch. `systemctl is-system-running` asks over
systemd's private socket as root, so it answers even after dbus.service has
stopped; it prints the state word and exits non-zero for anything but
"running", which is why the exit status is ignored here. It prints "unknown"
when the query failed and "offline" without a booted systemd
(src/systemctl/systemctl-is-system-running.c): both mean "cannot tell".
"""

from __future__ import annotations

import subprocess

SYSTEMCTL = ("systemctl", "is-system-running")
STATES = frozenset({"initializing", "starting", "running", "degraded", "maintenance",
                    "stopping"})
GOING_DOWN = "stopping"


def manager_state(timeout: float = 3.0) -> str | None:
    """systemd's SystemState word, or None when systemd cannot be asked (no systemctl,
    no answer in `timeout` s, or a word systemctl never prints)."""
    try:
        result = subprocess.run(SYSTEMCTL, capture_output=True, text=True, timeout=timeout,
                                check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    word = result.stdout.strip()
    return word if word in STATES else None
