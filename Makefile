# make train: set up .venv and train the default CNN; make test: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Use the copy of the data beside this checkout when there is one (else: cache/download).
SHARED_DATA := $(abspath $(wildcard ../shared/data/fashion_mnist))
ifneq ($(SHARED_DATA),)
export FMNIST_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: install train test test-newest newest-python peers benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: install
	$(PY) -m fmnist_jax.train --model=cnn $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# The suite on the newest releases, on a Python >= 3.12 (Colab's): what pip installs there
# today (jax 0.12, flax 0.12.12 when written), in .venv-newest.
# (pyenv's shims answer `command -v` even for a Python they cannot run: each is tried.)
NEWEST_PYTHON ?= $(lastword $(foreach p,python3.12 python3.13 python3.14 \
    $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3),\
    $(shell $(p) -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null)))
# A DeprecationWarning raised from fmnist_jax's own code fails the run there (an API on its
# way out is replaced before it is removed), and the Colab notebook installs itself into a
# fresh runtime as on Colab.
test-newest:
	@if [ -z "$(NEWEST_PYTHON)" ]; then echo "test-newest: no python3.12, 3.13 or 3.14 on PATH (set NEWEST_PYTHON=...)"; exit 2; fi
	$(NEWEST_PYTHON) -m venv .venv-newest
	.venv-newest/bin/python -m pip install -q --upgrade pip
	.venv-newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-newest/bin/python --version
	.venv-newest/bin/python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|tensorflow-datasets|grain|numpy|ml_dtypes) '
	FMNIST_TEST_COLAB_INSTALL=1 .venv-newest/bin/python -m pytest -q \
	    -W "error::DeprecationWarning:fmnist_jax" $(ARGS)

# The newest Python on this machine (>= 3.12), or nothing.
newest-python:
	@echo $(NEWEST_PYTHON)

# PyTorch (CPU) and Keras 3 on TensorFlow, in their own venv, for the benchmark's peers.
peers: .venv-peers/.installed

.venv-peers/.installed:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	.venv-peers/bin/python -m pip install -q torch==2.13.0 tensorflow-cpu==2.21.0 keras==3.15.0
	touch $@

benchmark: install
	$(PY) experiments/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-peers .venv-newest runs .pytest_cache
