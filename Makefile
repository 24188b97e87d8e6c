# Two commands do all the set-up: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.asg-installed
# torch first, pinned, so that efficientnet-lite-pytorch's unpinned torch does not pull another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo demo-quick test test-fast bench lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/asg demo

demo-quick: setup
	$(BIN)/asg demo --quick

# pytest-xdist: one worker per core, each test module on one worker (so that a module's shared run is made once:
# the 2-process runs of test_distributed, the trained runs of test_predict, test_compare...); `make test XDIST=`
# runs everything in one process
XDIST ?= -n auto --dist loadscope

test: setup  # everything (CI runs it)
	$(BIN)/python -m pytest $(XDIST)

test-fast: setup  # the tests not marked slow: no end-to-end run, no process started
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: setup
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
