# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install the package with the torch pin
# from constraints.txt (CPU wheel); later runs reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-mmseg lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt "torch==2.13.0" numpy
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dinov.demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -m "not mmseg and not gpu" tests

lint: $(STAMP)
	$(PY) -m ruff check dinov designers eval tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
