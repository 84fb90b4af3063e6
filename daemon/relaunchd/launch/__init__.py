"""Launch methods, one module each (DESIGN "platform" layer).

- `file_loader`: kexec_file_load — works under lockdown, no DRTM (measured kexec).
- `segment_loader`: kexec_load with relaunchd's own zero page, SLRT and
  purgatory — the only way a kexec can end in a Secure Launch (drtm.md §2.6).
"""
