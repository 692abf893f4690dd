# `make run` / `make test` work on a fresh machine: they create .venv when missing and install the
# project (editable, with dev extras) only when pyproject.toml changed since the last install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dismax-plugin-installed

.PHONY: venv run test lint bench docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import dismax_plugin, timm, pytorch_ood, mlflow, pytest" 
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m dismax_plugin compare --output runs/make-run --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The documentation (docs/): HTML with warnings as errors and nitpicky references, then every example in it
# (docs/build.py: sphinx-build -W --keep-going -n -b html, then -b doctest, in one process).
DOCS_BUILD := docs/_build
docs: $(STAMP)
	$(PY) docs/build.py $(DOCS_BUILD)
	@echo "docs: $(DOCS_BUILD)/html/index.html"

bench: $(STAMP)
	$(PY) benchmarks/head_cost.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info $(DOCS_BUILD)
