# The two commands of the README. Both set everything up on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	# open_clip is the tokenizer reference; --no-deps keeps it from pulling torchvision or another torch.
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $@ $(VENV)/.installed-base

# Generate images with the embedded default model (no checkpoint, no torch needed).
demo: $(VENV)/.installed-base
	$(BIN)/sdjax generate --prompt "a red circle on a blue background" -n 8 --seed 0 --out outputs/demo --grid

# Lint and run the whole test suite (installs torch==2.13.0 and diffusers as references).
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/unet_step.py
