"""relaunchd — Linux kexec secure-relaunch daemon."""

__version__ = "0.1.0"
