# The two commands of the README, as root on a fresh Debian/Ubuntu machine:
#   make run    install what is needed, run the daemon in the foreground (default policy)
#   make test   install what is needed, lint, type-check and run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
METRICS ?= 127.0.0.1:9464
# rustup's cargo lives here on CI runners; Debian's cargo is installed below when absent.
export PATH := $(HOME)/.cargo/bin:$(PATH)

# iptables: the daemon's chains; iproute2: test network namespaces; curl: a build script's
# child in the tests; dnsmasq-base: the tests' real upstream DNS server; util-linux: unshare
# (a build with its own resolv.conf in the tests); procps: pgrep/ps for operators;
# python3-venv: the virtualenv; systemd: systemd-analyze checks the unit in the tests;
# prometheus (promtool) and prometheus-alertmanager: the alert rules and delivery tests.
APT_PACKAGES := iptables iproute2 curl dnsmasq-base util-linux procps python3-venv \
	ca-certificates systemd prometheus prometheus-alertmanager

.PHONY: run test deps apt venv lint typecheck unit kernel bench fuzz clean install uninstall

deps: apt venv

apt:
	@[ "$$(id -u)" = 0 ] || { echo "make: run as root (apt packages, netfilter, cgroups)"; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if ! command -v cargo >/dev/null; then missing="$$missing cargo"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

run: deps
	$(VENV)/bin/egress-monitor run --policy policies/default.yaml --events - --metrics-listen $(METRICS)

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

kernel: deps
	$(VENV)/bin/pytest -q tests/kernel

test: deps lint typecheck
	$(VENV)/bin/pytest -q -ra tests

bench: deps
	$(VENV)/bin/python bench/egress_bench.py

# The long fuzz run (tests/fuzz/README.md); `make test` runs a short one of every harness.
FUZZ_SEED ?= 1
FUZZ_JOBS ?= 2
fuzz: venv
	$(VENV)/bin/python -m tests.fuzz.run --binary-inputs 1000000 --yaml-inputs 200000 \
	  --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS)

# Into /opt/egress-monitor, /etc/egress-monitor and systemd (DESTDIR=... for a staging root).
install: apt
	PYTHON=$(PYTHON) bash scripts/install.sh install

uninstall:
	bash scripts/install.sh uninstall

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
