# Two commands for a new machine (as root: natgwd and its tests need network namespaces):
#   make demo   install everything, run the seed gateway in namespaces with real traffic
#   make test   install everything, run the unit and integration tests
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's packages: the nftables binding is only packaged there (not on PyPI).
APT_PACKAGES := nftables libnftables1 python3-nftables python3-venv iproute2 conntrack \
	iputils-ping curl tcpdump iperf3 systemd iptables gcc libc6-dev \
	podman buildah runc debootstrap systemd-container procps keepalived conntrackd prometheus shellcheck \
	frr bird2
PYTEST_ARGS ?= -n 2

.PHONY: deps venv demo test test-unit test-image image lint bench clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

# `natgwd` on PATH: a link to the venv's command (never over a natgwd installed otherwise,
# nor over another checkout's link that still works; BIN_LINK= for none). A link whose
# checkout is gone is replaced; `make clean` removes this checkout's link.
BIN_LINK ?= /usr/local/bin/natgwd
NATGWD := $(abspath $(VENV))/bin/natgwd

venv: deps $(VENV)/.installed
	@if [ -n "$(BIN_LINK)" ] && [ "$$(readlink "$(BIN_LINK)")" != "$(NATGWD)" ]; then \
		if [ -e "$(BIN_LINK)" ] && [ ! -L "$(BIN_LINK)" ]; then \
			echo "$(BIN_LINK) is not natgwd's link: left alone; the CLI is $(NATGWD)"; \
		elif [ -e "$(BIN_LINK)" ]; then \
			echo "$(BIN_LINK) links another checkout ($$(readlink "$(BIN_LINK)")): left alone;" \
				"the CLI is $(NATGWD) (rm $(BIN_LINK) and make venv again to link it)"; \
		elif [ -L "$(BIN_LINK)" ]; then \
			echo "$(BIN_LINK) linked $$(readlink "$(BIN_LINK)"), which is gone: relinked"; \
			ln -sfn "$(NATGWD)" "$(BIN_LINK)" && echo "linked $(BIN_LINK) -> $(NATGWD)"; \
		else ln -sfn "$(NATGWD)" "$(BIN_LINK)" && echo "linked $(BIN_LINK) -> $(NATGWD)"; fi; \
	fi

demo: venv
	$(PY) -m natgwd.lab.demo
	@echo; if [ -n "$(BIN_LINK)" ] && [ "$$(readlink "$(BIN_LINK)")" = "$(NATGWD)" ]; then \
		echo "The natgwd command is on PATH: $(BIN_LINK) -> $(NATGWD) (try: natgwd --help)"; \
	else echo "The natgwd command: $(NATGWD) (try: $(NATGWD) --help)"; fi

test: venv lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit

image: venv
	PYTHON=$(PY) image/build-offline.sh

test-image: venv
	$(PY) -m pytest -m image tests/integration/test_image.py

lint: venv
	$(VENV)/bin/ruff check natgwd tests benchmarks
	$(VENV)/bin/ruff format --check natgwd tests benchmarks
	$(VENV)/bin/mypy natgwd

# Root, about 17 minutes at the default sizes (the interleaved throughput section: 6; the cold start with
# the EIPs: 2): writes benchmarks/RESULTS.md and results/.
BENCH_ARGS ?=
bench: venv
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	@if [ -n "$(BIN_LINK)" ] && [ "$$(readlink "$(BIN_LINK)")" = "$(NATGWD)" ]; then \
		rm -f "$(BIN_LINK)" && echo "removed $(BIN_LINK) (linked this checkout's natgwd)"; fi
	rm -rf $(VENV) build *.egg-info
