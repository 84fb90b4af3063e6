"""The engine layer: the whole behaviour, callable from Python with no bus — the state
machine (`core`) split by feature (`stage`, `relaunch`, `proof`, `catalogue`), its records
(`state`), its configuration (`config`, `config_file`). It reaches the machine only through
the `machine.Machine` protocol (`host_machine.HostMachine` on the real host) and reports
changes in its own vocabulary; the adapters map them to D-Bus, the journal and Prometheus."""
