# Two commands on a fresh machine:  make train  (set-up, data, the default run)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: train test bench demo export tensorboard notebook notebook-run clean web web-serve

# One venv; each stamp reinstalls only when its requirements file changes. The core is requirements.txt.
$(VENV)/.core: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.core requirements-dev.txt requirements-demo.txt requirements-export.txt \
                    requirements-tensorboard.txt  # what the tests need
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.demo: $(VENV)/.core requirements-demo.txt
	$(PY) -m pip install --quiet -r requirements-demo.txt
	touch $@

$(VENV)/.export: $(VENV)/.core requirements-export.txt
	$(PY) -m pip install --quiet -r requirements-export.txt
	touch $@

$(VENV)/.tensorboard: $(VENV)/.core requirements-tensorboard.txt
	$(PY) -m pip install --quiet -r requirements-tensorboard.txt
	touch $@

$(VENV)/.notebook: $(VENV)/.core requirements-notebook.txt
	$(PY) -m pip install --quiet -r requirements-notebook.txt
	touch $@

train: $(VENV)/.core  ## fetch MNIST, train with the defaults, write metrics and plots to runs/
	$(PY) train.py $(ARGS)

# The static page's one npm package (web/package-lock.json). make test installs it where npm is, for tests/test_web.py.
web/node_modules/.installed: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is not installed: install Node.js with npm (nodejs.org)" >&2; exit 2; }
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

test: $(VENV)/.installed $(if $(shell command -v npm),web/node_modules/.installed)  ## lint, then the test suite (CPU only; fetches real MNIST once)
	$(PY) -m ruff check .
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.core  ## throughput of the classic and fast pipelines
	$(PY) bench.py $(ARGS)

demo: $(VENV)/.demo  ## the draw-a-digit page on http://127.0.0.1:7860 for the newest runs/*/best.pt
	$(PY) demo.py $(ARGS)

export: $(VENV)/.export  ## ONNX model of a checkpoint: make export ARGS="runs/.../best.pt --out model.onnx"
	$(PY) export.py $(ARGS)

web: $(VENV)/.export web/node_modules/.installed  ## the static page in web/dist for the newest runs/*/best.pt (or ARGS)
	$(PY) web/build.py $(ARGS)

web-serve:  ## serve web/dist (make web) on http://127.0.0.1:8000 (ARGS=PORT for another port)
	$(PYTHON) web/serve.py $(ARGS)

tensorboard: $(VENV)/.tensorboard  ## TensorBoard on http://127.0.0.1:6006 for the runs in runs/
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 $(ARGS)

notebook: $(VENV)/.notebook  ## JupyterLab with ipywidgets in the project venv, opening S5.ipynb on the venv's kernel
	$(VENV)/bin/jupyter lab S5.ipynb $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache web/dist web/node_modules

notebook-run: $(VENV)/.installed  ## execute S5.ipynb in place (fast recipe, no progress bars): the outputs it is committed with
	env -u MPLBACKEND S5_RECIPE=fast S5_DEMO=0 S5_PROGRESS=0 $(VENV)/bin/jupyter-execute --inplace --timeout=1800 S5.ipynb
