# sg-jobs: `make serve` installs everything and starts the API and a worker; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sgjobs-installed

.PHONY: install serve test test-fast lint format lock clean bench-smoke

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24,<26"
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/sgjobs serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

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
