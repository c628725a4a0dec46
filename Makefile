# Two commands for a fresh machine: `make serve` and `make test` (both idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned, so that no resolver ever pulls another build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tandem serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# import-linter cannot walk setuptools' editable finder: check a symlinked tree.
	mkdir -p build/lint/tandem && touch build/lint/tandem/__init__.py
	for d in server scheduler engine kernels; do ln -sfn ../../../$$d build/lint/tandem/$$d; done
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports ../../pyproject.toml
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m benchmarks.offline

clean:
	rm -rf $(VENV) build *.egg-info
