# orderflow: `make run` runs the whole system, `make test` runs the tests.
# Both create the virtual environment and install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test bench asyncapi clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

## Temporal dev server (UI on :8233), migrations, API (:8000), bridge, workers, audit; Ctrl-C stops all.
run: install
	$(BIN)/python -m services.stack

## The whole test suite against real PostgreSQL, RabbitMQ and Temporal servers.
test: install
	$(BIN)/pytest

## 200 orders through the whole pipeline with the real fault injector (see docs/performance.md).
bench: install
	$(BIN)/python bench/lifecycle.py --orders 200

## Regenerate the AsyncAPI document from the contract models.
asyncapi: install
	$(BIN)/python -m shared.asyncapi > docs/asyncapi.json

clean:
	rm -rf $(VENV) .run .pytest_cache
