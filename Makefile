# orderflow: `make run` runs the whole system, `make test` runs the tests.
# Both create the virtual environment and install what they need first, at the locked versions.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# The locks, with hashes: dev.txt is everything `make` installs (the runtime dependencies and the
# test and dev extras), runtime.txt the same versions without the extras, for the Docker image.
# uv's `pip compile` makes them: it resolves for every platform at once (--universal, so a Linux
# image and a macOS laptop get the same versions) in seconds, and writes plain requirements files,
# so pip installs them and nothing but `make lock` needs uv.
DEV_LOCK := requirements/dev.txt
RUNTIME_LOCK := requirements/runtime.txt
UV := uv==0.13.9
COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" --quiet

.PHONY: install lock run check lint types format test bench chaos asyncapi clean

## The locked dependencies, then orderflow itself (editable); a lock that pyproject.toml's
## dependencies have changed since is refused: run `make lock`.
install: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml $(DEV_LOCK) | $(BIN)/python
	$(BIN)/python requirements/fingerprint.py --check $(DEV_LOCK)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes --requirement $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --editable .
	touch $@

## Lock pyproject.toml's dependencies again, keeping each locked version that it still allows
## (`make lock UPGRADE=1`: the newest it allows); commit the locks with pyproject.toml.
lock: | $(BIN)/python
	$(BIN)/pip install --quiet $(UV)
	$(COMPILE) --extra test --extra dev $(if $(UPGRADE),--upgrade) --output-file $(DEV_LOCK)
	$(COMPILE) --constraint $(DEV_LOCK) --output-file $(RUNTIME_LOCK)
	for lock in $(DEV_LOCK) $(RUNTIME_LOCK); do $(BIN)/python requirements/fingerprint.py >> $$lock; done

## Temporal dev server (UI on :8233), migrations, API (:8000), bridge, workers, audit; Ctrl-C stops all.
## The gateway trusts a local development issuer whose key is made in .run/ on first start
## (`orderflow token --role reviewer --subject rita` prints a token). Where nothing answers at the
## default database or broker URL, it starts an embedded PostgreSQL, and a RabbitMQ of its own when
## rabbitmq-server is installed, their data in .run/ too; what it cannot have is one line on stderr.
run: install
	$(BIN)/python -m devstack

## The gate before the tests (and CI): ruff's lint rules and format, then mypy (strict), over the
## whole tree, as pyproject.toml configures them; any finding fails it.
check: lint types

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: install
	$(BIN)/mypy

## Apply ruff's safe fixes and its format: what `make lint` asks for, where ruff can do it itself.
format: install
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

## The gate, then the whole test suite against real PostgreSQL, RabbitMQ and Temporal servers; a
## server or program the machine lacks stops it before the first test, with one line on how to get it.
## The test files run on TEST_WORKERS pytest-xdist workers, each with its own database, vhost and
## Temporal servers (most tests wait on servers, so three keep two cores busy); mypy runs beside
## them, and a finding of either fails it.
TEST_WORKERS ?= 3
test: lint
	$(BIN)/mypy & typing=$$!; \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile; tests=$$?; \
	wait $$typing && exit $$tests

## 200 orders through the whole pipeline with the real fault injector (see docs/performance.md).
bench: install
	$(BIN)/python bench/lifecycle.py --orders 200

## 300 orders while every process is killed -9 and every server restarted, on servers of its own.
chaos: install
	$(BIN)/python bench/chaos.py

## Regenerate the AsyncAPI document from the contract models.
asyncapi: install
	$(BIN)/python -m shared.asyncapi > docs/asyncapi.json

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
