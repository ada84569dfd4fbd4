# The two commands of the README, as root on a fresh Debian/Ubuntu machine:
#   make run    install what is needed, run the daemon in the foreground (default policy)
#   make test   install what is needed, lint, type-check and run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
METRICS ?= 127.0.0.1:9464
# rustup's cargo lives here on CI runners; Debian's cargo is installed below when absent.
export PATH := $(HOME)/.cargo/bin:$(PATH)

# What a runner needs to run the daemon is scripts/install.sh's RUNTIME_APT (read from there);
# the rest is for the tests only and never goes onto a runner through `make install`:
# iproute2: test network namespaces; curl: a build script's child in the tests; dnsmasq-base:
# the tests' real upstream DNS server; util-linux: unshare (a build with its own resolv.conf);
# procps: pgrep/ps; systemd: systemd-analyze checks the unit; prometheus (promtool) and
# prometheus-alertmanager: the alert rules and delivery tests.
RUNTIME_APT := $(shell sed -n 's/^RUNTIME_APT="\(.*\)"$$/\1/p' scripts/install.sh)
TEST_APT := iproute2 curl dnsmasq-base util-linux procps systemd prometheus \
	prometheus-alertmanager
# The real-crate workspaces of bench/realcrates.py (`make test` builds 20 of them,
# `make bench` ~160): Debian's crate sources, unpacked under /usr/share/cargo/registry (a
# cargo directory source, so no network), and the C libraries their -sys build scripts find.
REALCRATES_CRATES := serde serde-derive serde-json toml anyhow regex itertools indexmap \
	hashbrown smallvec bytes once-cell lazy-static bitflags hex base64 sha2 rand url crossbeam \
	rayon env-logger clap clap-derive uuid csv unicode-segmentation textwrap petgraph rustc-hash \
	nom tokio futures ring openssl openssl-sys libz-sys flate2 zstd zstd-sys xz2 lzma-sys bzip2 \
	bzip2-sys rusqlite libsqlite3-sys nix libc syn quote proc-macro2 thiserror log memchr cc \
	pkg-config
REALCRATES_APT := $(foreach c,$(REALCRATES_CRATES),librust-$(c)-dev) libssl-dev zlib1g-dev \
	libzstd-dev liblzma-dev libbz2-dev libsqlite3-dev pkg-config gcc
APT_PACKAGES := $(RUNTIME_APT) $(TEST_APT) $(REALCRATES_APT)
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' egress_monitor/__init__.py)
DIST := dist/egress-monitor-$(VERSION)
# `make run` and `make install` leave the command on PATH here.
BINDIR ?= /usr/local/bin
INSTALLED ?= /opt/egress-monitor/venv/bin/egress-monitor

.PHONY: run test deps apt venv lint typecheck unit kernel bench soak fuzz clean install uninstall dist path

deps: apt venv

apt:
	@[ "$$(id -u)" = 0 ] || { echo "make: run as root (apt packages, netfilter, cgroups)"; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if ! command -v cargo >/dev/null; then missing="$$missing cargo"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# Events go to the events file (EVENTS=- for JSON on stdout); on a terminal the daemon prints
# one human line per build, alert and would-be denial.
EVENTS ?= /var/log/egress-monitor/events.jsonl
run: deps path
	$(VENV)/bin/egress-monitor run --policy policies/default.yaml --events $(EVENTS) \
	  --metrics-listen $(METRICS)

# A link in $(BINDIR) to this checkout's command, unless an installed one is there.
path: venv
	@link=$(BINDIR)/egress-monitor; target=$$(readlink "$$link" 2>/dev/null || true); \
	if [ -e "$$link" ] && [ "$$target" = $(INSTALLED) ]; then \
	  echo "egress-monitor on PATH is the installed one ($$target); this checkout's is $(CURDIR)/$(VENV)/bin/egress-monitor"; \
	elif [ -e "$$link" ] && [ ! -L "$$link" ]; then \
	  echo "$$link exists and is not a link: left alone"; \
	else \
	  ln -sfn $(CURDIR)/$(VENV)/bin/egress-monitor "$$link" && echo "egress-monitor: $$link -> $(CURDIR)/$(VENV)/bin/egress-monitor"; \
	fi

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

# Latency against the NFQUEUE floor and the unmonitored baseline, throughput, then ~160 real
# crates built and tested under the enforcing daemon (docs/benchmarks.md).
bench: deps
	@status=0; $(VENV)/bin/python bench/egress_bench.py || status=1; \
	$(VENV)/bin/python bench/realcrates_bench.py || status=1; exit $$status

# 5,000 builds in a row: the daemon's RSS slope per 1,000 builds, fds, time per build.
soak: deps
	$(VENV)/bin/python bench/soak.py

# The long fuzz run (tests/fuzz/README.md); `make test` runs a short one of every harness.
FUZZ_SEED ?= 1
FUZZ_JOBS ?= 2
fuzz: venv
	$(VENV)/bin/python -m tests.fuzz.run --binary-inputs 1000000 --yaml-inputs 200000 \
	  --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS)

# Into /opt/egress-monitor, /etc/egress-monitor and systemd (DESTDIR=... for a staging root).
# Only runtime packages (RUNTIME_APT, without recommends) are installed; see docs/operations.md.
install:
	PYTHON=$(PYTHON) bash scripts/install.sh install

# A self-contained artifact for runners without a package index: the wheels of the package
# and its dependencies, the install script and the files it installs. On the runner:
#   tar xzf egress-monitor-VERSION.tar.gz && cd egress-monitor-VERSION && bash scripts/install.sh install
dist: venv
	rm -rf $(DIST) $(DIST).tar.gz
	mkdir -p $(DIST)/scripts
	$(VENV)/bin/pip wheel -q -w $(DIST)/wheelhouse .
	cp -r systemd deploy policies docs $(DIST)/
	cp scripts/install.sh $(DIST)/scripts/
	tar -C $(dir $(DIST)) -czf $(DIST).tar.gz $(notdir $(DIST))
	rm -rf $(DIST)
	@echo "$(DIST).tar.gz"

uninstall:
	bash scripts/install.sh uninstall

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info dist build
