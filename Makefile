# Two commands: `make sync` creates .venv with uv (installing uv with pip when missing), `make test` runs the tests.
# `make demo` runs all of SemLA offline on a small procedural world (DEMO_ARGS, e.g. DEMO_ARGS="--seed 1"; DEMO_ARGS="--model san": on SAN, into demo_output/san).
# `make bench` runs each benchmark's quick smoke run on the tiny model (the recorded runs: bench/BENCHMARKS.md).
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

bench:
	$(UV) run --frozen python bench/catseg_speed.py --preset tiny --reps 1
	$(UV) run --frozen python bench/fusion_overhead.py --preset tiny
	$(UV) run --frozen python bench/semla_overhead.py --preset tiny --images 3
	$(UV) run --frozen python bench/startup.py --reps 1 --modes cache
	$(UV) run --frozen python bench/merging_speed.py --preset tiny --loop-preset tiny --reps 1
	$(UV) run --frozen python bench/san_speed.py --preset tiny --reps 1

format:
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

clean:
	rm -rf .venv .pytest_cache .ruff_cache *.egg-info
