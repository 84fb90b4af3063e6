"""The launch layer: how a staged image reaches the next kernel.

One module per launch method behind one interface (`protocol.LaunchMethod`): `kexec`
(measured kexec), `txt` (Intel TXT dynamic launch), `skinit` (AMD SKINIT, reported but not
buildable). `registry` names them, `assessment` judges the machine for all of them,
`staging` builds and loads the sealed kernel, initrd and command line, and
`segment_loader` the kexec_load segments (zero page, SLRT, purgatory) a DRTM launch needs.
"""
