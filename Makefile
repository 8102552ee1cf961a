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

.PHONY: install train test peers benchmark clean

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
	rm -rf $(VENV) .venv-peers runs .pytest_cache
