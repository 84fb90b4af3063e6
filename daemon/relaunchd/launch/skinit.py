"""The `skinit` method: AMD SKINIT through a Secure Kernel Loader (launch layer).

Readiness is reported (SVM, SKINIT, the IOMMU, a TIS TPM, TrenchBoot's SKL), but a launch
cannot be built: the Secure Launch v16 kernel is Intel-only (its `sl_stub` stops on CPUs
without SMX) and the AMD-enabled kernel and SKL hand-off are not posted upstream
(dl-handler.md "AMD").
"""

from __future__ import annotations

from relaunchd.errors import NotReady
from relaunchd.launch import checks
from relaunchd.launch.checks import Check, Verdict
from relaunchd.launch.protocol import LaunchRequest
from relaunchd.launch.segment_loader import SegmentInputs
from relaunchd.platform.readiness import PlatformFacts, read_facts


class SkinitMethod:
    name = "skinit"
    drtm = True
    default_loader = "segments"

    def verdict(self, facts: PlatformFacts) -> Verdict:
        return Verdict(self.name, tuple(_skinit_checks(facts)))

    def segment_inputs(self, request: LaunchRequest) -> SegmentInputs:
        verdict = self.verdict(read_facts(request.probe_config))
        if not verdict.ready:
            raise NotReady(f"the {self.name} method is not ready: {verdict.summary()}")
        raise NotReady("SKINIT launches are not implemented (no Secure Kernel Loader "
                       "hand-off; the Secure Launch v16 kernel is Intel-only); use --method "
                       "txt or kexec")


def _skinit_checks(ctx: PlatformFacts) -> list[Check]:
    out = checks.arch_checks(ctx, "AuthenticAMD", "AMD SKINIT")
    vendor_ok = bool(out[-1].ok)
    if vendor_ok:
        # Secure Launch v16 is Intel-only: its stub stops on CPUs without SMX, and the
        # AMD Secure Kernel Loader path is not posted upstream (dl-handler.md "AMD").
        out.append(Check("skinit-no-kernel-support", False,
                         "no Secure Launch kernel accepts an SKINIT launch: the v16 series "
                         "is Intel TXT only (its entry stub stops on CPUs without SMX)",
                         "use the kexec method (measured kexec) on AMD until Secure Launch "
                         "supports SKINIT"))
    if vendor_ok:
        for flag in ("svm", "skinit"):
            if flag not in ctx.flags:
                out.append(Check(f"cpu-no-{flag}", False, f"the CPU has no {flag} flag",
                                 "use an SKINIT-capable AMD CPU on bare metal"))
        vm_cr = ctx.value("cpu.vm_cr")
        if "svm" in ctx.flags:
            if vm_cr is None:
                out.append(Check("svm-state-unknown", None,
                                 f"VM_CR unreadable: {ctx.why('cpu.vm_cr')}",
                                 "modprobe msr and run the check as root"))
            elif vm_cr["svm_disabled"]:
                out.append(Check("svm-disabled", False, "SVM is disabled by firmware "
                                 "(VM_CR.SVMDIS)", "enable SVM in firmware setup"))
            else:
                out.append(Check("svm-enabled", True, "SVM enabled"))
        out += checks.iommu_checks(ctx, "IVRS")
        out.append(Check("skl", True, "Secure Kernel Loader present")
                   if ctx.value("launch.skl") else
                   Check("skl-missing", False,
                         f"no Secure Kernel Loader at {ctx.facts['launch.skl'].path}",
                         "install TrenchBoot's skl.bin or pass --skl"))
    out += checks.tpm_checks(ctx, "SKINIT needs a discrete TPM on TIS" if vendor_ok else None)
    out += checks.drtm_common(ctx)
    return out
