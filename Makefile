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
	$(PIP) install -q -c constraints.txt -e ".[dev,tensorboard,lm]"
	touch $(STAMP)

# Pretrains the small demo backbone once (cached in runs/demo), then the four-arm
# V-pretraining comparison (demo/vpretrain.py); results in runs/vdemo.
demo: $(STAMP)
	$(PY) -m demo.vpretrain

test: $(STAMP)
	$(PY) -m pytest -m "not mmseg and not gpu" tests

lint: $(STAMP)
	$(PY) -m ruff check dinov designers eval slurm tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step.py

# Optional mmsegmentation adapter (eval/mmseg_backbone.py). Its own venv, because
# mmcv < 2.2 has no wheel for this torch and is compiled from source (about 6 minutes
# on 2 cores, DESIGN section 7); `make test` never needs it. The stamp makes a second
# `make test-mmseg` skip the install.
MMSEG_VENV := .venv-mmseg
MMSEG_PY := $(MMSEG_VENV)/bin/python
MMSEG_PIP := $(MMSEG_PY) -m pip
MMSEG_STAMP := $(MMSEG_VENV)/.installed

$(MMSEG_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(MMSEG_VENV)
	$(MMSEG_PIP) install -q -c constraints.txt "torch==2.13.0" numpy
	$(MMSEG_PIP) install -q -c constraints.txt "setuptools<81" wheel ninja
	MAX_JOBS=2 $(MMSEG_PIP) install -q --no-build-isolation -c constraints.txt "mmcv>=2.0.0rc4,<2.2.0"
	$(MMSEG_PIP) install -q -c constraints.txt -e ".[dev,mmseg]" ftfy regex
	touch $(MMSEG_STAMP)

test-mmseg: $(MMSEG_STAMP)
	$(MMSEG_PY) -m pytest -m mmseg tests/test_mmseg.py tests/test_faults_eval.py

clean:
	rm -rf $(VENV) .venv-mmseg runs .pytest_cache
