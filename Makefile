# geofm-assets: `make demo` and `make test` work on a fresh machine (Python 3.11 + pip).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Clay's published encoder code (the claymodel wheel, never installed: tests import its files
# to check that our encoder gives the same embeddings)
CLAY_REFERENCE := $(VENV)/reference/claymodel-1.5.0-py3-none-any.whl
export DAGSTER_HOME := $(CURDIR)/dagster_home
SIZE ?= demo

.PHONY: setup system-deps demo test ui lint clean-lake

setup: $(STAMP)

# torch goes first, in its own pip call, pinned: a CPU build of 2.13.0 lies on this machine's
# disk, and an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	mkdir -p $(VENV)/reference
	$(PIP) download --quiet --no-deps -d $(VENV)/reference claymodel==1.5.0
	# Clay v1's blocks come from vit-pytorch; --no-deps: it would pull torchvision and a CUDA torch
	$(PIP) install --quiet --no-deps vit-pytorch==1.6.4
	touch $(STAMP)

demo: setup
	$(VENV)/bin/geofm demo --size $(SIZE)

# Real servers the tests start: Debian's chromium + chromium-driver (the browser test) and
# PostgreSQL (the instance test). Installed here when missing and this runs as root with apt
# (CI does); elsewhere those tests skip and say why.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || echo "could not install$$missing: the tests that need them will skip"; \
	else echo "missing$$missing and not root: the tests that need them will skip"; fi

test: setup system-deps
	GEOFM_CLAY_REFERENCE=$(CLAY_REFERENCE) $(VENV)/bin/python -m pytest

ui: setup
	$(VENV)/bin/dagster dev -w workspace.yaml

lint: setup
	$(VENV)/bin/ruff check geofm_assets tests bench
	$(VENV)/bin/mypy geofm_assets

clean-lake:
	rm -rf dagster_home/lake
