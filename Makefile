# Two commands on a fresh machine:  make train  (set-up, data, the default run)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: train test bench notebook clean

# The venv is rebuilt only when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

train: $(VENV)/.installed  ## fetch MNIST, train with the defaults, write metrics and plots to runs/
	$(PY) train.py $(ARGS)

test: $(VENV)/.installed  ## lint, then the test suite (CPU only; fetches real MNIST once)
	$(PY) -m ruff check .
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed  ## throughput of the classic and fast pipelines
	$(PY) bench.py $(ARGS)

$(VENV)/.notebook: $(VENV)/.installed requirements-notebook.txt
	$(PY) -m pip install --quiet -r requirements-notebook.txt
	touch $@

notebook: $(VENV)/.notebook  ## JupyterLab with ipywidgets in the project venv, opening S5.ipynb on the venv's kernel
	$(VENV)/bin/jupyter lab S5.ipynb $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
