# mongoproxy build/test entry points.  `make test` is what CI runs (.ci/run).
# Every prerequisite step is idempotent: stamped or self-checking, so a second
# run spends its time only on lint, typecheck and the tests.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

# Tools we build (ferretdb) live in .tools/bin; Debian puts haproxy in /usr/sbin.
export PATH := $(CURDIR)/.tools/bin:$(PATH):/usr/sbin:/sbin

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.ci-stamp
PYTEST_ARGS ?=

.PHONY: deps tools node lint typecheck test run bench docs clean

$(PY):
	python3 -m venv $(VENV)

# Reinstall only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

deps: $(STAMP)

# Each script checks for itself and returns at once when already installed.
tools:
	bash scripts/install-system-deps.sh
	bash scripts/install-ferretdb.sh

# npm ci only when the lockfile changes or node_modules is missing.
$(NODE_STAMP): $(NODE_DIR)/package-lock.json $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $@

node: $(NODE_STAMP)

lint: deps
	$(VENV)/bin/ruff check proxy tests bench scripts

# `mypy` alone checks the packages listed in pyproject ([tool.mypy] files);
# the second run covers the dev scripts and the test helpers.
typecheck: deps
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy scripts tests/support tests/conftest.py

test: deps tools node
	$(MAKE) --no-print-directory lint typecheck
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

run: deps tools
	$(PY) scripts/devstack.py

# The standard comparison (docs/performance.md): the multi-tenant workload against
# direct / tcp (HAProxy) / proxy / proxy-cache on a private stack, closed and open loop,
# then the connection storm. Writes bench/results/latest/ (git-ignored) and nothing
# else: bench.{json,md}, its charts, storm.{json,md}. The report is written even when
# the storm fails, and then `make bench` exits non-zero. About 5 minutes. To publish a
# run in docs/performance.md (its generated block only):
#   python -m bench report --run bench/results/latest/bench.json \
#     --storm bench/results/latest/storm.json --doc docs/performance.md
# The micro-benchmarks: python -m bench core|pool|observe|tenancy|cache|ab.
BENCH_OUT   := bench/results/latest
BENCH_RUN   := run --mode closed,open --scale 0.05 --duration 20 --rounds 4 --concurrency 16 --rate 20 --out $(BENCH_OUT) --name bench
BENCH_STORM := storm --connections 10000 --ops 1 --scale 0.05 --json $(BENCH_OUT)/storm.json
bench: deps tools
	$(PY) -m bench $(BENCH_RUN)
	status=0; $(PY) -m bench $(BENCH_STORM) || status=$$?; \
	$(PY) -m bench report --run $(BENCH_OUT)/bench.json --storm $(BENCH_OUT)/storm.json; \
	exit $$status

# docs/configuration.md from the configuration models (a test fails when it is stale).
docs: deps
	$(PY) -m scripts.gen_config_docs

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules
