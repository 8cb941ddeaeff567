# sg-jobs: `make serve` installs everything and starts the API and a worker; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sgjobs-installed

.PHONY: install browser serve test test-fast lint format lock clean bench-smoke

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24,<26"
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/sgjobs serve $(ARGS)

# Two pytest workers: most of a test's time is spent waiting (processes starting, trainings,
# leases running out), so two share the 2 CPUs well. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
# The slowest tests are listed at the end of every run: what to look at when the suite grows slow.
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30

# The dashboard's browser tests (tests/dashboard) drive Debian's Chromium through Playwright.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

test: install browser
	$(PYTEST) $(ARGS)

test-fast: install browser
	$(PYTEST) -m "not slow" $(ARGS)

bench-smoke: install
	$(BIN)/python -m bench.smoke

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app worker

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: install
	@echo "Regenerating requirements.lock from $(VENV)"
	@{ sed -n '1,4p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable --all | grep -v -E '^(pip|sg-jobs)=='; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
