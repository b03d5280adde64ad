# StoreLens: thin targets; everything real lives in the Python package and scripts/.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
SHARED ?= $(abspath ../shared)
# Wait up to 10 minutes for another apt/dpkg (unattended upgrades, a second terminal) instead of failing.
APT := apt-get -o DPkg::Lock::Timeout=600
export SHARED

.PHONY: setup demo test test-fast bench eval lint clean

setup: $(STAMP)
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser tests"; \
	  ($(APT) update -qq || true) && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq chromium chromium-driver; }
	@./scripts/build_dashboard.sh

$(STAMP): pyproject.toml
	@command -v mosquitto >/dev/null || command -v /usr/sbin/mosquitto >/dev/null || \
	  { echo "installing Debian's mosquitto"; ($(APT) update -qq || true) && \
	    DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq mosquitto mosquitto-clients; }
	@command -v mosquitto_sub >/dev/null || DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq mosquitto-clients
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[device,cloud,models,scale,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -p no:cacheprovider -m "not slow" tests

bench: setup
	$(BIN)/python -m bench $(if $(QUICK),--quick)

eval: setup
	$(BIN)/python scripts/eval_grocery.py
	$(BIN)/python scripts/eval_loop.py

lint: setup
	$(BIN)/ruff check storelens models device cloud tests bench scripts
	$(BIN)/mypy

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
