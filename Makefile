PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format migrate bench bench-env loadtest clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/chatbot serve

test: install
	$(BIN)/pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmarks (not part of `make test`): each scenario writes its part of
# bench/results/latest.json and latest.md, which the README quotes. About 20 minutes.
BENCH_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
bench: install bench-env
	$(BIN)/python bench/overhead.py --database-url $(BENCH_DATABASE_URL)
	$(BIN)/python bench/capacity.py --database-url $(BENCH_DATABASE_URL)
	$(BIN)/python bench/throughput.py --database-url $(BENCH_DATABASE_URL)
	$(BIN)/python bench/cpu.py --database-url $(BENCH_DATABASE_URL)
	$(BIN)/python bench/instances.py --database-url $(BENCH_DATABASE_URL)
	$(BIN)/python bench/growth.py --databases sqlite,$(BENCH_DATABASE_URL)
	$(BIN)/python bench/ratelimit.py

# The peer the benchmarks measure against: the LiteLLM proxy, in a venv of its own, never a
# dependency of the project; pinned with its dependencies in bench/requirements-peers.txt.
PEERS_VENV := bench/.venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
bench-env: $(PEERS_STAMP)

$(PEERS_STAMP): bench/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r bench/requirements-peers.txt
	touch $(PEERS_STAMP)

# Concurrent streaming conversations for 60 s, then a row-by-row check of the database: 400 on
# PostgreSQL (production), 300 on SQLite (a laptop): what one worker holds on two cores with
# time to first token still well under a second. Both run even if the first fails; on
# PostgreSQL it drops and recreates LOADTEST_PG_DATABASE.
LOADTEST_PG_DATABASE ?= loadtest
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python bench/loadtest.py --database $(BENCH_DATABASE_URL) --streams 400 \
		--pg-database $(LOADTEST_PG_DATABASE) $(LOADTEST_ARGS) \
		--output bench/results/loadtest-postgresql.json; postgresql=$$?; \
	$(BIN)/python bench/loadtest.py --database sqlite --streams 300 $(LOADTEST_ARGS) \
		--output bench/results/loadtest-sqlite.json; sqlite=$$?; \
	test $$postgresql -eq 0 && test $$sqlite -eq 0

migrate: install
	$(BIN)/chatbot migrate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
