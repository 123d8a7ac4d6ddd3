# Two commands matter: `make reproduce` and `make test`. Each creates .venv from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= small
STAMP := $(VENV)/.installed
# pytest workers: the 2-core default; PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2

.PHONY: venv reproduce test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,baselines]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (.venv)" >/dev/null
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m experiments --scale $(SCALE) $(if $(RESUME),--resume,)

test: $(STAMP)
	TRAINSTEP_NB_STEPS=100 $(PY) -m pytest -n $(PYTEST_WORKERS) --nbmake tests notebooks

bench: $(STAMP)
	$(PY) -m benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
