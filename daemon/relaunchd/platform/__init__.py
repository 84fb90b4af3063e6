"""The platform layer: everything that touches the machine, through one root prefix
(`sysroot.SysRoot` reads, `sysroot_writer.SysWriter` writes) so tests point it at fixture
trees: image and certificate files, sealed memfds, kexec syscalls, the memory map, Secure
Boot/lockdown, TXT registers, the TPM and its extend log, readiness facts, quiesce, logind
inhibitors (behind an interface), atomic file writes. Knows nothing of D-Bus."""
