# The two commands: `make run` starts the whole stack, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test lint format install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Start web (ASGI), worker, beat and Flower on embedded defaults; Ctrl-C stops all.
run: install
	@mkdir -p var
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo_user
	@echo "API      http://127.0.0.1:8000/my/projects/   (docs: /api/docs/, admin: /admin/)"
	@echo "Flower   http://127.0.0.1:5555/"
	bin/with-redis -- $(BIN)/honcho start -p 8000 web worker beat flower

## Run the test suite (against DATABASE_URL / REDIS_URL when set, else SQLite and a
## throwaway bundled Redis).
test: install-dev
	@mkdir -p var
	bin/with-redis --ephemeral -- $(BIN)/pytest $(PYTEST_ARGS)

## Lint: ruff, and the import contracts that keep the apps' layering (pyproject.toml).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Benchmarks print tables (see bench/). They FLUSH the Redis they use, so each gets a
## throwaway bundled one here; bench/workspaces.py also needs PostgreSQL (DATABASE_URL).
bench: install-dev
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/workspaces.py
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/agentbus.py
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/chat.py

clean:
	rm -rf $(VENV) var staticfiles
