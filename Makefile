# The two front doors (see README):
#   make demo   set up, build the demo detector's repository, serve it, detect over gRPC, report
#   make test   set up and run the test suite (what CI runs)
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-all lint clean

setup:
	./scripts/setup.sh

demo: setup
	$(PY) -m detserve.app.cli demo

test: setup
	$(PY) -m pytest -q -m "not slow" --durations=40 tests

test-all: setup
	$(PY) -m pytest -q tests

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy detserve converters clients

clean:
	rm -rf model_repository/*/ .pytest_cache .mypy_cache .ruff_cache
