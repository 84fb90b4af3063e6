"""x86-specific formats: the boot protocol (zero page, setup header, setup_data, e820), the
firmware memory map as values and its allocator, the purgatory, the kexec_load segment plan."""
