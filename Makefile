# Two commands do all the set-up on a fresh machine:
#   make demo   quantize and sample the tiny VAR model offline (no checkpoints, no GPU)
#   make test   the test suite (CPU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

$(VENV)/.core: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e ".[test,eval-tf]"
	touch $@

.PHONY: demo test bench-synthetic clean
demo: $(VENV)/.core
	$(PY) -m VAR.demo --out outputs/demo

test: $(VENV)/.test
	$(PY) -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$status

bench-synthetic: $(VENV)/.core
	$(PY) benchmarks/synthetic_layers.py

clean:
	rm -rf $(VENV) outputs
