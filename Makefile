# The two commands a user needs: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint soak bench gpu-smoke rehearsal clean browser services

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=68,<82" wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/stylebot run

# The e2e web chat test drives Debian's chromium (playwright cannot download browsers here).
browser:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

# Storage/service tests run on a real PostgreSQL and the integration tests on a real Redis: tests/servers.py
# starts throwaway servers on 127.0.0.1 from Debian's binaries (nothing else uses these packages).
services:
	command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y --no-install-recommends redis-server postgresql)

test: $(STAMP) browser services
	$(BIN)/ruff check bot cli engine settings storage tests bench
	$(BIN)/mypy bot cli engine settings storage
	$(BIN)/pytest -q

# The full load and crash drills (long; `make test` runs them in a shorter form), figures printed.
soak: $(STAMP) services
	STYLEBOT_SOAK=1 $(BIN)/pytest -q -s tests/integration/test_drills.py tests/e2e/test_load.py

lint: $(STAMP)
	$(BIN)/ruff check bot cli engine settings storage tests bench
	$(BIN)/mypy bot cli engine settings storage

# GPU benchmarks: run on a machine with CUDA (not part of `make test`); BENCHMARKS.md has results.
bench: $(STAMP)
	$(BIN)/python -m bench.gpu_check ../shared/fixtures
	$(BIN)/python -m bench.perf --out bench/results/latest

# GPU smoke: every engine operation on CUDA through the real worker (run on a GPU machine after
# every engine change; not part of `make test`). OFFICIAL: a clone of NVlabs/stylegan2-ada-pytorch.
OFFICIAL ?= ../stylegan2-ada-pytorch
gpu-smoke: $(STAMP)
	$(BIN)/python -m bench.gpu_smoke --official-code $(OFFICIAL)

# Dress rehearsal: `stylebot run` on the GPU against the e2e fake Telegram server, 1 then 16 users;
# latency through the chat (BENCHMARKS.md, "Through the chat"). Run it after gpu-smoke (warm cache).
rehearsal: $(STAMP)
	$(BIN)/python -m bench.rehearsal --official-code $(OFFICIAL)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
