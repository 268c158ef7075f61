# Two entry points that work on a fresh machine: `make chat` and `make test`.
# Both create ./.venv with the CPU build of PyTorch on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= examples/picture.png
QUESTION ?= Describe the picture in one sentence.

# TORCH_INDEX: a wheel index for torch, e.g. PyTorch's CPU builds (make chat TORCH_INDEX=https://download.pytorch.org/whl/cpu);
# by default pip's own index, which outside this project's machines resolves torch to a multi-GB CUDA build.
TORCH_INDEX ?=

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

# Chat needs only the package itself; the tests need the test extra (transformers, the server,
# Ray, a browser driver: about 2 GB), installed by `make test` alone.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: chat test shapes-model shapes-free-model bench-llamacpp
chat: $(VENV)/.installed
	$(BIN)/llavakit chat --image $(IMAGE) "$(QUESTION)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# Retrain the shipped model from scratch (about 40 minutes on 2 cores); the result lands in shapes-run/model.
shapes-model: $(VENV)/.installed-test
	LLAVAKIT=$(BIN)/llavakit scripts/train_shapes_model.sh shapes-run

# The free shapes world's model (docs/shapes-world.md; not the shipped one yet): about 95 minutes on 2
# cores, resumable (a finished step is skipped, stage 2 goes on from its last checkpoint).
shapes-free-model: $(VENV)/.installed-test
	LLAVAKIT=$(BIN)/llavakit PYTHON=$(BIN)/python scripts/train_free_shapes_model.sh shapes-free-run

# llavakit against llama.cpp on the same decoder (bench/llamacpp.py); builds llama-cpp-python from source
# with this CPU's instruction set (about 15 minutes on 2 cores the first time).
bench-llamacpp: $(VENV)/.installed-test
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/llamacpp.py
