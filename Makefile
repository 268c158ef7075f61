# Two entry points that work on a fresh machine: `make chat` and `make test`.
# Both create ./.venv with the CPU build of PyTorch on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= examples/picture.png
QUESTION ?= What is in the picture?

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: chat test
chat: $(VENV)/.installed
	$(BIN)/llavakit chat --image $(IMAGE) "$(QUESTION)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q
