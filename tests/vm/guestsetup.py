"""relaunchd set up in the guest as a site would: trust, image directory, quiesce plan,
metrics, and a D-Bus update tool. Shared by the relaunch tests, `make demo` and the
downtime benchmark, so all three relaunch the same configuration."""

from __future__ import annotations

from pathlib import Path

from .machine import GuestError, Machine

IMAGES = "/var/lib/relaunchd/images"
PROM = "/var/lib/prometheus/node-exporter/relaunchd.prom"
CONFIG = "/etc/relaunchd/relaunchd.yaml"
UPDATE_TOOL_PATH = "/usr/local/sbin/rld-update"
BUS = "org.relaunchd.Relaunch1 /org/relaunchd/Relaunch1 org.relaunchd.Relaunch1.Manager"

# The update tool: stage over D-Bus (busctl: no relaunchd code on the client side),
# follow State until staged, print the relaunch id.
UPDATE_TOOL = f"""#!/bin/sh
set -eu
B="{BUS}"
id=$(busctl call $B Stage 'sa{{sv}}' "$1" 0 | cut -d'"' -f2)
for _ in $(seq 1200); do
    st=$(busctl get-property $B State | cut -d'"' -f2)
    [ "$st" = staged ] && {{ echo "$id"; exit 0; }}
    [ "$st" = failed ] && {{ busctl get-property $B LastError >&2; exit 1; }}
    sleep 0.25
done
echo "not staged in time (state $st)" >&2
exit 1
""".encode()


def rng_address(guest: Machine) -> str:
    """The virtio-rng PCI function (vendor 1af4, device 1005 legacy / 1044 modern): a
    device nothing needs, so unbinding it in the quiesce is safe."""
    found = guest.run("for d in /sys/bus/pci/devices/*; do "
                      "case $(cat $d/vendor):$(cat $d/device) in "
                      "0x1af4:0x1005|0x1af4:0x1044) basename $d;; esac; done").output.split()
    if len(found) != 1:
        raise GuestError(f"expected one virtio-rng PCI function, found {found}")
    return found[0]


def configure(guest: Machine, *, cert: Path, cert_path: str, written_by: str,
              unbind: tuple[str, ...] = ()) -> None:
    """Trust `cert` (installed at `cert_path`), stage from IMAGES, offline every AP and
    unbind `unbind` in the quiesce, write the Prometheus textfile; restart relaunchd."""
    guest.run(f"install -d -m 0755 {IMAGES} /etc/relaunchd {Path(PROM).parent}")
    guest.put(cert_path, cert)
    guest.put(UPDATE_TOOL_PATH, UPDATE_TOOL, mode=0o755)
    devices = ", ".join(f'"{address}"' for address in unbind)
    guest.put(CONFIG, f"""# written by {written_by}
image_dirs: [{IMAGES}]
trust:
  certificates: [{cert_path}]
launch:
  method: kexec
quiesce:
  offline_cpus: auto
  unbind_devices: [{devices}]
metrics:
  textfile_path: {PROM}
""".encode())
    guest.run("relaunchd --check-config && systemctl restart relaunchd")
