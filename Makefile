# Set-up and the everyday commands. `make smoke` and `make test` build the venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RESULTS ?= results/smoke
# On CPU-only machines this pin resolves to the CPU build that pip finds first on this
# machine's disk; elsewhere point PIP_EXTRA_INDEX_URL at the PyTorch CPU index.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv smoke test test-all lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

smoke: venv
	$(VENV)/bin/frontier smoke --results $(RESULTS)

test: venv
	$(VENV)/bin/pytest -q

test-all: venv
	$(VENV)/bin/pytest -q -m ""

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) benchmarks/orchestration_overhead.py
	$(PY) benchmarks/lm_throughput.py
	$(PY) benchmarks/chinchilla_fit.py

clean:
	rm -rf $(VENV) build *.egg-info
