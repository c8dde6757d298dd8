# The README's two commands are `make demo` and `make test`; both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-gemma3 train-demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# STEER and its baselines on the shipped Qwen2 demo pair (models/), the report under runs/demo/.
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m steer_jax.cli demo --config configs/demo.yaml --out runs/demo

demo-gemma3: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m steer_jax.cli demo --config configs/demo-gemma3.yaml --out runs/demo-gemma3

# Retrains the four demo models into models/ (deterministic from the seed; see the README for the time).
train-demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m steer_jax.cli train-demo --out models

# One pytest process per heavy test file: a single process over the whole suite accumulates
# thousands of compiled XLA programs and once segfaulted inside the CPU compiler near the end;
# fresh processes keep each one small. The light files (a few programs each) share one process,
# which imports torch, transformers and JAX and builds the tiny models once for all of them.
# Two processes run at once, the slowest first (longest first packs two jobs best), each printing
# its output when done: the files mostly compile, on one core each. Every file runs even after a
# failure; the exit status reports any. All of them share one fresh compilation cache
# (tests/conftest.py says why), removed at the end.
TEST_JOBS ?= 2
SLOW_FIRST := tests/test_steer.py tests/test_checkpointing.py tests/test_continuous.py \
	tests/test_distributed.py
SLOW_THEN := tests/test_paging.py tests/test_rsd_tokenizers.py tests/test_decoding.py \
	tests/test_steer_resume.py tests/test_routing_latency.py tests/test_mixture_pool.py \
	tests/test_modeling.py
LIGHT_A := tests/test_eval_configs.py tests/test_panel_matmul.py tests/test_gmm.py \
	tests/test_scale_workload.py tests/test_sweep_grid.py
LIGHT_B = $(filter-out $(SLOW_FIRST) $(SLOW_THEN) $(LIGHT_A) tests/test_demo_models.py,\
	$(wildcard tests/test_*.py))
test: $(STAMP)
	@cache=$$(mktemp -d); \
	{ for f in $(SLOW_FIRST); do echo $$f; done; echo "$(LIGHT_B)"; echo tests/test_demo_models.py; \
	  echo "$(LIGHT_A)"; for f in $(SLOW_THEN); do echo $$f; done; } | \
		JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=$$cache xargs -P $(TEST_JOBS) -I{} \
		sh -c 'out=$$($(PY) -m pytest -q $$1 2>&1); rc=$$?; printf "== %s\n%s\n" "$$1" "$$out"; \
		exit $$rc' sh {}; \
	rc=$$?; rm -rf $$cache; exit $$rc

bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/decode.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/matmul16.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/gmm.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/paging.py

clean:
	rm -rf $(VENV) runs .pytest_cache
