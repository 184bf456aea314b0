# Two entry points: `make run` (server + web demo on ./collab.db) and `make test` (install all, run all tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 1234
DB     ?= ./collab.db
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test bench install install-py install-js install-browser demo clean

install: install-py install-js

install-py: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install-js: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's Chromium for the browser tests (tools cannot download their own browser builds here).
install-browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: install-js
	npm run --silent build:demo

run: install demo
	$(BIN)/collab-server serve --host $(HOST) --port $(PORT) --db $(DB)

test: install install-browser demo
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-py benchmarks/node_modules/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# Benchmark peers (Hocuspocus builds better-sqlite3 from source) stay out of the test install.
benchmarks/node_modules/.installed: benchmarks/package.json benchmarks/package-lock.json
	cd benchmarks && npm ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) node_modules benchmarks/node_modules web_demo/dist
