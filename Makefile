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
NODE_STAMP := node_modules/.installed

.PHONY: help workshop test kernel lint format base-model triton clean

help:
	@echo "make workshop    install and run every notebook (local backend) into outputs/"
	@echo "make test        install test dependencies, lint, run the whole test suite"
	@echo "make kernel      install, and register .venv as the Jupyter kernel 'Python 3 (workshop)'"
	@echo "                 in your home directory (for SageMaker Studio or your own JupyterLab)"
	@echo "make base-model  rebuild the committed tiny base model (about 60 min on 2 CPU cores)"
	@echo "make triton      start a local Triton server in the foreground (Ctrl-C stops it)"
	@echo "make clean       remove outputs/ (keeps .venv)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The venv's own "python3" kernelspec lives inside .venv, where only a Jupyter running from
# .venv looks (first, before the home directory): papermill in `make workshop` and the tests
# run the notebooks on it, and nothing is written into the user's home directory.
$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 \
		--display-name "Python 3 (workshop)" > /dev/null
	touch $@

# Another Jupyter (SageMaker Studio's, or a JupyterLab outside .venv) looks for kernels in the
# home directory, not in .venv: register the venv there under its own name, so that it does
# not shadow anyone's default "python3" kernel. Run again after moving the clone.
kernel: $(RUNTIME_STAMP)
	$(BIN)/python -m ipykernel install --user --name workshop \
		--display-name "Python 3 (workshop)"

# The CDK toolchain: notebook 04 synthesizes the AWS stack, and the tests check it.
$(CDK_STAMP): cdk/requirements.txt $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -r cdk/requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(CDK_STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# newman, which runs the API's Postman collection in the tests, pinned by package-lock.json.
# Without npm, that test skips and says why (as the CDK tests do without node).
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm > /dev/null; then \
		npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the newman test will skip (install Node.js 20 or newer)"; fi

workshop: $(RUNTIME_STAMP) $(CDK_STAMP)
	$(BIN)/workshop notebooks

test: $(DEV_STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/hadolint model_code/serving_image/Dockerfile
	$(BIN)/pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/hadolint model_code/serving_image/Dockerfile

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

base-model: $(RUNTIME_STAMP)
	$(BIN)/python -m helpers.workshop.basemodel --output assets/tiny-sd-shapes

triton: $(RUNTIME_STAMP)
	$(BIN)/workshop triton

clean:
	rm -rf outputs
