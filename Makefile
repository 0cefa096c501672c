# The two commands: `make run` starts the whole stack, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# make run's web port (Flower's: FLOWER_PORT, default 5555).
export WEB_PORT ?= 8000
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test contract lint format install install-dev bench clean manage celery

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
## The banner with the token and URLs comes once everything answers.
# The development settings (DEBUG, a key from the repo): every entry point defaults to
# production, so what runs locally says so here.
run: export DJANGO_SETTINGS_MODULE = config.settings.local
# Every process of the stack writes its HTTP / Celery metrics here; /admin/metrics sums them.
run: export PROMETHEUS_MULTIPROC_DIR ?= $(CURDIR)/var/prometheus
run: install
	@mkdir -p var
	@rm -rf "$(PROMETHEUS_MULTIPROC_DIR)" && mkdir -p "$(PROMETHEUS_MULTIPROC_DIR)"
	@echo "Preparing the database (migrate) and the demo user (make run's alone)..."
	@$(BIN)/python manage.py migrate --noinput -v 0
	@$(BIN)/python manage.py demo_user > /dev/null
	@echo "Starting web, worker, beat and Flower; the token and URLs follow once they answer."
	@bin/with-redis --interrupt-ok -- $(BIN)/honcho start -p $(WEB_PORT) web worker maintenance webhooks beat flower banner

## Run the test suite (against DATABASE_URL / REDIS_URL when set, else SQLite and a
## throwaway bundled Redis). On the throwaway Redis it runs in TEST_WORKERS processes
## (pytest-xdist), each with a Redis database, a test database and a Qdrant folder of
## its own; against a given REDIS_URL in one (the suite empties the database it is given),
## or in parallel when TEST_REDIS_DATABASES lists one database per process (.ci/run:
## 15,14,13,12). Four processes on two cores: much of the suite waits on the processes
## it starts, and its longest files start first (tests/conftest.py).
TEST_WORKERS ?= 4
PYTEST_PARALLEL ?= $(if $(REDIS_URL),$(if $(TEST_REDIS_DATABASES),-n $(TEST_WORKERS) --dist loadfile,),-n $(TEST_WORKERS) --dist loadfile)
test: export DJANGO_SETTINGS_MODULE = config.settings.test
test: install-dev
	@mkdir -p var
	bin/with-redis --ephemeral -- $(BIN)/pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

## The contract tests only: schemathesis against the schema, the generated client's
## journey, the browser test (part of `make test` too).
contract: export DJANGO_SETTINGS_MODULE = config.settings.test
contract: install-dev
	@mkdir -p var
	bin/with-redis --ephemeral -- $(BIN)/pytest tests/contract tests/browser $(PYTEST_ARGS)

## Lint: ruff, the import contracts that keep the apps' layering (pyproject.toml), and
## no file-level import cycle, imports inside functions included (bin/check_imports.py).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python bin/check_imports.py

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Benchmarks print tables (see bench/). They FLUSH the Redis they use, so each gets a
## throwaway bundled one here; bench/workspaces.py also needs PostgreSQL (DATABASE_URL).
bench: export DJANGO_SETTINGS_MODULE = config.settings.local
bench: install-dev
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/workspaces.py
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/agentbus.py
	env -u REDIS_URL bin/with-redis --ephemeral -- $(BIN)/python bench/chat.py

## Operators' commands with the venv and the development settings (README, Operating it):
## make manage ARGS="agentbus_worker --project <uuid>", make celery ARGS="inspect agentbus_status"
manage celery: export DJANGO_SETTINGS_MODULE ?= config.settings.local
manage: install
	$(BIN)/python manage.py $(ARGS)
celery: install
	$(BIN)/celery -A config $(ARGS)

clean:
	rm -rf $(VENV) var staticfiles
