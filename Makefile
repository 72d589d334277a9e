# The two set-up commands of a fresh machine: `make test` and `make shards`.
# Each creates .venv when missing, installs the project (editable) once per change of
# pyproject.toml, then does its job. Re-running is quick: the install step is skipped.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 (CPU) lies on disk in /opt/wheels on our machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS)

# `make shards` defaults: a small dataset that renders in a few minutes on 2 cores.
SHARDS_DIR  ?= data/shards
ASSETS_DIR  ?= data/assets
CHARACTERS  ?= 8
POSES       ?= 3817
PER_CHAR    ?= 12
RESOLUTION  ?= 256x384
WORKERS     ?= 2

.PHONY: test test-fast shards install clean bench gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## the full suite but GPU tests (what CI runs)
test: $(STAMP)
	$(PY) -m pytest -q

## the quick tier: no Blender, no Ray, no training loops (under a minute on 2 cores)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not blender and not ray and not slow and not gpu'

## the main job: default manifests (procedural characters, pose library, backgrounds), then render,
## verify, and write the report page (data/shards/report/index.html; its path is printed last)
shards: $(STAMP)
	$(VENV)/bin/serialgen assets build --procedural $(CHARACTERS) --poses $(POSES) --out $(ASSETS_DIR)
	$(VENV)/bin/serialgen render --assets $(ASSETS_DIR) --out $(SHARDS_DIR) \
	    --poses-per-character $(PER_CHAR) --resolution $(RESOLUTION) --workers $(WORKERS)
	$(VENV)/bin/serialgen shards verify $(SHARDS_DIR)
	$(VENV)/bin/serialgen report $(SHARDS_DIR) --assets $(ASSETS_DIR)

# The person estimator's own venv (MediaPipe 0.10.21: its models ship in its wheel; its pins clash
# with ours, so it is not in .venv). Once per machine, about a minute and ~1 GB from PyPI.
ESTIMATOR_VENV ?= $(HOME)/.cache/serialgen/estimator-mediapipe-0.10.21
estimator: $(STAMP)
	$(VENV)/bin/serialgen estimator setup --venv $(ESTIMATOR_VENV)

## GPU readiness on a lent GPU machine (docs/stage1.md): paper-size Stage I/II steps and Stage I inference,
## from source, no install; needs no venv (the machine's python3 with torch); diffusers from a carried .whl/
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --json gpu-check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) data build *.egg-info
