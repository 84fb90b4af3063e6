"""The formats layer: pure — bytes and values in, values out (PE/UKI, Authenticode, PCR 11,
cpio/initrd, command line, event logs, ACM headers, SLRT; `x86/`: the boot protocol, memory
ranges, purgatory, the segment plan). No file opening, no stat, no sysfs: descriptors and
bytes come from the caller. Imports nothing of relaunchd but `errors`."""
