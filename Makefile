# Set-up and entry points. Every target builds the virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MINUTES ?= 15

.PHONY: demo test test-all lint bench venv clean-venv

# The venv is rebuilt when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# The whole pipeline on the example pair in examples/ (or A=... B=... videos of your own), MINUTES of training.
demo: $(VENV)/.installed
	$(PY) demo.py $(if $(A),--video-a $(A)) $(if $(B),--video-b $(B)) $(if $(OUT),--out-dir $(OUT)) --minutes $(MINUTES)

# The fast tier: unit tests and short runs on the committed data (a few minutes on 2 cores).
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# Everything: the fast tier and the slow end-to-end tests (kill -9, Ctrl-C, torchrun, the demo).
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "" tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --out bench_out/benchmarks.json

clean-venv:
	rm -rf $(VENV)
