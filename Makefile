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

# The main job: a study on the bundled AIME 2024 replay data (SQLite file ./allot.db, no API key).
demo: $(STAMP)
	$(BIN)/allot db upgrade
	$(BIN)/allot study run --name demo --budget-fraction 0.05 --trials 40

# The whole test suite (ruff, then pytest: SQLite, PostgreSQL, Redis, RabbitMQ, real worker processes).
test: $(STAMP)
	@# the review page's browser tests drive Debian's chromium (installed once; we run as root)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/replay_throughput.py
