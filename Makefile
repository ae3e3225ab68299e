# Everything runs from .venv, created and filled on first use: `make test` on a fresh clone
# needs no other step. The stamp makes an unchanged tree reinstall nothing.
PYTHON3 ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# Pinned: an unpinned torch would resolve to the multi-GB CUDA build.
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,triton,plot,serve,onnx
STAMP   := $(VENV)/.canet-installed
CSRC    := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) 2>/dev/null)

.PHONY: test demo lint bench info clean venv

venv: $(STAMP)

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml csrc/sources.txt $(CSRC)
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install '$(TORCH)'
	$(PIP) install 'setuptools>=64' wheel ninja pybind11
	$(PIP) install --no-build-isolation -e '.[$(EXTRAS)]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/canet demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pytest benches/ --benchmark-only

info: $(STAMP)
	$(PY) -m canet.info

clean:
	rm -rf build dist *.egg-info $(STAMP)
	find canet -name '_C*.so' -delete
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
