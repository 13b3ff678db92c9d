# Set-up and entry points. Every target builds the virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

# The venv is rebuilt when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Whole pipeline on the default example (or A=... B=... videos of your own).
demo: $(VENV)/.installed
	$(PY) demo.py $(if $(A),--video-a $(A)) $(if $(B),--video-b $(B)) $(if $(OUT),--out-dir $(OUT))

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --out bench_out/benchmarks.json

clean-venv:
	rm -rf $(VENV)
