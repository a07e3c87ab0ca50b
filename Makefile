# Two commands: `make sync` creates .venv with uv (installing uv with pip when missing), `make test` runs the tests.
# `make demo` runs all of SemLA offline on a small procedural world (DEMO_ARGS, e.g. DEMO_ARGS="--seed 1").
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")

.PHONY: sync test demo lint format bench clean

sync:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

test:
	$(UV) run --frozen pytest

demo:
	$(UV) run --frozen python -m semla_demo $(DEMO_ARGS)

lint:
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format:
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

clean:
	rm -rf .venv .pytest_cache .ruff_cache *.egg-info
