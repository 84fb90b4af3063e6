"""formats.x86 layer."""
