"""The `kexec` method: a measured kexec, no dynamic launch (launch layer).

The staged kernel, initrd and command line are extended into a PCR with a log (platform
`tpm_extend_log`) before the hand-off; nothing resets the TPM's PCRs, so the proof after the
new boot rests on that log. Loaded with kexec_file_load, which works under lockdown when the
kernel can verify the image's signature; with `--loader segments` it is a hand-off
rehearsal of relaunchd's own zero page, SLRT and purgatory without a DCE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relaunchd.launch import checks
from relaunchd.launch.checks import Check, Verdict
from relaunchd.launch.protocol import LaunchRequest

if TYPE_CHECKING:
    from relaunchd.launch.segment_loader import SegmentInputs
    from relaunchd.platform.readiness import PlatformFacts


class KexecMethod:
    name = "kexec"
    drtm = False
    default_loader = "file"

    def verdict(self, facts: PlatformFacts) -> Verdict:
        return Verdict(self.name, tuple(_kexec_checks(facts)))

    def segment_inputs(self, request: LaunchRequest) -> SegmentInputs:
        """No DCE, no DL handler: the SLRT carries no dynamic launch (a rehearsal)."""
        # Imported here: the segment loader (~25 ms) is not needed to stage a plain kexec,
        # which imports this module for its default loader.
        from relaunchd.launch.segment_loader import SegmentInputs

        return SegmentInputs()


def _kexec_checks(ctx: PlatformFacts) -> list[Check]:
    out = [checks.kexec_support_check(ctx, "kexec_file_load")]
    if (c := checks.kexec_enabled_check(ctx)) is not None:
        out.append(c)
    if (c := checks.lockdown_known(ctx)) is not None:
        out.append(c)
    else:
        sig = ctx.value("kexec.sig") or {}
        if ctx.lockdown != "none" and not sig.get("KEXEC_SIG"):
            out.append(Check("lockdown-unsigned-kexec", False,
                             f"kernel lockdown ({ctx.lockdown}) refuses kexec_file_load "
                             "and the kernel cannot verify signatures (no CONFIG_KEXEC_SIG)",
                             "boot a kernel with CONFIG_KEXEC_SIG or without lockdown"))
        elif ctx.lockdown != "none" or sig.get("KEXEC_SIG_FORCE"):
            out.append(Check("kexec-signed-only", True,
                             "kexec_file_load accepts only kernels signed by a key the kernel "
                             "trusts (lockdown/KEXEC_SIG_FORCE)"))
        else:
            out.append(Check("lockdown-none", True, "no kernel lockdown"))
    out += checks.tpm_checks(ctx, None)
    return out
