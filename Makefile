# relaunchd — developer entry points. See README.md.
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
HOST_PKGS := .ci/host-packages.txt .ci/vm-packages.txt
# Large downloaded/built inputs (kernel .deb, guest images) live here, keyed by
# what they were made from; never inside the repository.
export RELAUNCHD_CACHE ?= $(HOME)/.cache/relaunchd

.PHONY: setup test unit integration vm-test demo lint bench clean dl-handler

setup: $(VENV)/.setup-done dl-handler

# relaunchd's Intel TXT DL handler (docs/drtm.md): a freestanding x86-64 binary built
# with Debian's gcc/binutils, reproducibly, outside the source tree.
DL_HANDLER_SRC := daemon/relaunchd/launch/dl_handler
DL_HANDLER := build/dl-handler/txt-dl-handler.bin
dl-handler: $(DL_HANDLER)

$(DL_HANDLER): $(wildcard $(DL_HANDLER_SRC)/*.[chS] $(DL_HANDLER_SRC)/*.lds) \
		$(DL_HANDLER_SRC)/Makefile $(VENV)/.setup-done
	$(MAKE) -C $(DL_HANDLER_SRC) O=$(abspath build/dl-handler)

$(VENV)/.setup-done: $(HOST_PKGS) pyproject.toml requirements-dev.txt .ci/install-deps
	.ci/install-deps $(HOST_PKGS)
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

lint: setup
	$(VENV)/bin/ruff check daemon tests benchmarks
	$(VENV)/bin/lint-imports

unit: setup
	$(VPY) -m pytest -m unit tests

integration: setup
	$(VPY) -m pytest -m integration tests

test: setup lint
	$(VPY) -m pytest tests

demo: setup
	$(VPY) tests/support/demo.py

# Every benchmark runs and prints its figures; the exit status says whether all targets
# were met.
bench: setup
	rc=0; for b in inspect_uki stage check; do $(VPY) benchmarks/$$b.py || rc=1; done; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info .pytest_cache

# --- Debian package and the VM tier (docs/vm.md) ---------------------------
# The guest image and packages are cached under $(RELAUNCHD_CACHE) by input hash.
.PHONY: deb vm-test vm-shell bench-downtime

deb: setup
	packaging/build-deb

vm-test: setup
	$(VPY) -m pytest -m vm tests/vm

vm-shell: setup
	PYTHONPATH=tests $(VPY) -m vm shell

# Downtime of a relaunchd relaunch vs. Debian's kexec and a firmware reboot, in one
# guest (docs/vm.md). Not part of `test` or `bench`: ~3 min per round under TCG.
# Options: make bench-downtime DOWNTIME_ARGS="--rounds 5 --json out.json"
bench-downtime: setup
	$(VPY) benchmarks/downtime.py $(DOWNTIME_ARGS)
