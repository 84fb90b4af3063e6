"""The launch methods' names, strongest first (launch layer, no imports): what the
configuration and the CLI validate against without loading any method."""

NAMES = ("txt", "skinit", "kexec")       # a DRTM launch before a plain measured kexec
DRTM_NAMES = ("txt", "skinit")           # the launches that reset PCRs 17–22


def is_drtm(name: str) -> bool:
    return name in DRTM_NAMES
