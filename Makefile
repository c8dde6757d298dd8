# The README's two commands are `make demo` and `make test`; both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Until the trained demo pair ships (issue #7), the demo is the most useful real thing that runs
# offline: our engine against HF transformers on the same random checkpoint (parity and speed),
# and the on-device mixture fit against scikit-learn.
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/decode.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/gmm.py

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests

bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/decode.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/gmm.py

clean:
	rm -rf $(VENV) runs .pytest_cache
