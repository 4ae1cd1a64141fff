# The workshop's two commands: `make workshop` and `make test`. Both create .venv when needed,
# install what they need, and are fast the second time (installs are redone only when a
# requirements file changes).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
CDK_STAMP := $(VENV)/.cdk-installed

.PHONY: help workshop test lint format base-model triton clean

help:
	@echo "make workshop    install and run every notebook (local backend) into outputs/"
	@echo "make test        install test dependencies, lint, run the whole test suite"
	@echo "make base-model  rebuild the committed tiny base model (about 30 min on 2 CPU cores)"
	@echo "make triton      start a local Triton server in the foreground (Ctrl-C stops it)"
	@echo "make clean       remove outputs/ (keeps .venv)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 \
		--display-name "Python 3 (workshop)" > /dev/null
	touch $@

# The CDK toolchain: notebook 04 synthesizes the AWS stack, and the tests check it.
$(CDK_STAMP): cdk/requirements.txt $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -r cdk/requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(CDK_STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

workshop: $(RUNTIME_STAMP) $(CDK_STAMP)
	$(BIN)/workshop notebooks

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

base-model: $(RUNTIME_STAMP)
	$(BIN)/python -m helpers.basemodel --output assets/tiny-sd-shapes

triton: $(RUNTIME_STAMP)
	$(BIN)/workshop triton

clean:
	rm -rf outputs
