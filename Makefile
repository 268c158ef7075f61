# Two entry points that work on a fresh machine: `make chat` and `make test`.
# Both create ./.venv with the CPU build of PyTorch on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= examples/picture.png
QUESTION ?= Describe the picture in one sentence.

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: chat test shapes-model
chat: $(VENV)/.installed
	$(BIN)/llavakit chat --image $(IMAGE) "$(QUESTION)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Retrain the shipped model from scratch (about 40 minutes on 2 cores); the result lands in shapes-run/model.
shapes-model: $(VENV)/.installed
	LLAVAKIT=$(BIN)/llavakit scripts/train_shapes_model.sh shapes-run
