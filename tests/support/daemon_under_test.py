"""relaunchd's service process with a test engine or machine, for the bus tests and the
soak benchmark: `python daemon_under_test.py KIND --config FILE [relaunchd options]`.

KIND: `fake-engine` (dbus_fake_engine: the bus over an engine that touches nothing) or
`fake-machine` (the real engine over dbus_fake_machine). It runs `relaunchd.daemon.main`
itself — the same service, signals, sd_notify and bus code as the installed `relaunchd` —
passing the constructors in, so production code has no way to load a test module.
"""

from __future__ import annotations

import sys

from relaunchd import daemon


def main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "fake-engine":
        import dbus_fake_engine

        return daemon.main(
            rest, load=dbus_fake_engine.load_config,
            make_engine=lambda config, notify: dbus_fake_engine.Engine(config, notify=notify))
    if kind == "fake-machine":
        from dbus_fake_machine import HostMachineWithoutSideEffects

        from relaunchd.engine.core import Engine

        return daemon.main(
            rest, make_engine=lambda config, notify: Engine(
                config, HostMachineWithoutSideEffects.from_config(config), notify=notify))
    print(f"daemon_under_test: unknown kind {kind!r} (fake-engine, fake-machine)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
