# Two entry points (see README): `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
# torch 2.13.0: the CPU build on CPU-only machines (and CUDA on GPU machines) from PyPI
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: venv demo test clean

$(BIN)/sweep: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/sweep

demo: $(BIN)/sweep
	$(BIN)/sweep run pipelines/demo.yaml
	$(BIN)/sweep best pipelines/demo.yaml --top 10

test: $(BIN)/sweep
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
