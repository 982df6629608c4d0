# The README's two commands: `make demo` and `make test`. Both create .venv on a fresh machine,
# install the project into it (skipped when pyproject.toml and constraints.txt have not changed),
# check for Java 17+ and point Spark's Python workers at the venv.
# Byte-compiling: pip's own pass is serial (on 2 cores it took install from 65 s to 112 s), so pip
# runs with --no-compile and one parallel `compileall -j 0` pass follows (~45 s). It is not optional:
# where PYTHONDONTWRITEBYTECODE=1 is set (as on our CI machines) Python never caches what it
# compiles, and every process recompiled torch, transformers and Mosaic from source on import
# (`from streaming import StreamingDataset` 10.7 s instead of 6.0 s, `import torch` 4.1 s instead of
# 2.4 s) — the suite starts hundreds of such processes (Spark workers, torchrun ranks, CLI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparkbridge-installed
OUT ?= demo-output
PYTEST_ARGS ?= --durations=20

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: model-test follow-ddp demo test install compile java bench lint clean cluster-demo

install: $(STAMP)

# sparkbridge itself is installed editable, so pip never compiles it: with PYTHONDONTWRITEBYTECODE=1
# every process recompiled its ~100 modules on import (~30 ms of the loader's construction in a
# fresh process, and again in every Spark worker and torchrun rank). compileall rewrites only what
# changed (~0.3 s otherwise); a stale .pyc is never used, Python checks the source's mtime and size.
# The notebooks are not modules (a notebook folder holds notebooks only, tests/jobs/test_notebooks.py).
compile: install
	@$(PY) -m compileall -qq -j 0 -x '/notebooks/' bridge etl jobs sparkbridge

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { echo ">> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> installing sparkbridge and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install --no-compile --progress-bar on -c constraints.txt -e '.[demo,test]'
	@echo ">> byte-compiling the installed packages (once)"
	@$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	@touch $@

java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "error: Java 17+ is required by Spark 4 and was not found on PATH." >&2; \
	  echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2; \
	  echo "  macOS:         brew install openjdk@17" >&2; exit 1; }
	@v=$$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1); \
	  if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then \
	    echo "error: Java 17+ is required by Spark 4, found: $$(java -version 2>&1 | head -1)" >&2; \
	    echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless (then set JAVA_HOME)" >&2; exit 1; fi

demo: compile java
	$(VENV)/bin/sparkbridge demo --out $(OUT)

test: compile java
	$(PY) -m pytest $(PYTEST_ARGS)

# the dataset log against its reference model, long: MODEL_EXAMPLES interleavings (default 10,000),
# roots on tmpfs when there is one (tests/log/test_log_model.py)
MODEL_EXAMPLES ?= 10000
MODEL_PROGRESS ?=
model-test: compile
	TMPDIR=$$( [ -d /dev/shm ] && echo /dev/shm || echo $${TMPDIR:-/tmp} ) SPARKBRIDGE_MODEL_EXAMPLES=$(MODEL_EXAMPLES) SPARKBRIDGE_MODEL_PROGRESS=$(MODEL_PROGRESS) \
		$(PY) -m pytest tests/log/test_log_model.py -k "not s3" -p no:cacheprovider -q

# Followed epochs under DDP at scale: FOLLOW_DDP_CASES randomized partitioned writes (sizes around every
# multiple of batch x world, empty ones, fewer rows than ranks) followed by 2 and by 3 torchrun ranks, one
# job per world size; every case must keep the ranks in lockstep and read every row once. `make test` runs
# 16 per world size.
FOLLOW_DDP_CASES ?= 110
FOLLOW_DDP_SEED ?= 1
follow-ddp: compile
	FOLLOW_DDP_CASES=$(FOLLOW_DDP_CASES) FOLLOW_DDP_SEED=$(FOLLOW_DDP_SEED) $(PY) -m pytest -s -q \
	  tests/bridge/test_follow_ddp.py -k randomized

bench: compile java
	$(VENV)/bin/sparkbridge bench all

lint: install
	$(VENV)/bin/hadolint docker/*.Dockerfile

clean:
	rm -rf $(OUT) bench-output .pytest_cache

# A Spark standalone master + 2 workers and SeaweedFS (S3) on 127.0.0.1, the flights ETL with
# spark-submit on it, torchrun training from S3; prints where each part ran, stops everything.
cluster-demo: compile java
	$(VENV)/bin/sparkbridge cluster-demo --rows $(or $(ROWS),20000)
