# The template repository's commands; `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PYTHON ?= python3
# The dev tools (linters, cookiecutter, compose) come from the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)
STANDIN_IMAGE ?= ddp-template-env:standin
DEMO_DIR ?= build/demo
DEMO_ANSWERS ?=
ENV_IMAGE ?= env

.PHONY: help venv test test-host lint demo bench soak standin-image docker-start docker-stop clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV)/.installed ## Create .venv with the pinned dev requirements

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --requirement requirements-dev.txt
	touch $@

test: venv ## Run every test: render, lint, host training, and containers (needs Docker)
	$(VENV)/bin/python -m pytest --durations=40

test-host: venv ## Run the tests that need neither a Docker Engine nor root (no docker, no slurm marker)
	$(VENV)/bin/python -m pytest -m "not docker and not slurm"

lint: venv ## Run pre-commit on the template repository
	$(VENV)/bin/pre-commit run --all-files

demo: venv ## Render the default project into build/demo and run its `make up`
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/cookiecutter --no-input --output-dir $(DEMO_DIR) . $(DEMO_ANSWERS)
	$(MAKE) -C $(DEMO_DIR)/ddp-project up ENV_IMAGE=$(ENV_IMAGE)

bench: standin-image ## Measure start-up, overhead, the loop, scaling, collectives, rebuilds (bench/results.*)
	$(VENV)/bin/python bench/bench.py

SOAK_HOST_RUNS ?= 200
SOAK_UP_RUNS ?= 20
soak: standin-image ## Run the host job and `make up` many times; count failed exits and stack traces
	$(VENV)/bin/python bench/soak.py --host-runs $(SOAK_HOST_RUNS) --up-runs $(SOAK_UP_RUNS) --record

standin-image: venv ## Build the registry-free stand-in for the conda env stage (root, Docker)
	rm -rf build/standin
	$(VENV)/bin/cookiecutter --no-input --output-dir build/standin .
	PYTHON=$(VENV)/bin/python scripts/standin-image.sh build/standin/ddp-project/environment.yml $(STANDIN_IMAGE)

docker-start: venv ## Install and start a Docker Engine with the Compose plugin (root; for CI)
	scripts/docker-engine.sh start

docker-stop: ## Stop the Docker Engine that docker-start started and remove its data
	scripts/docker-engine.sh stop

clean: ## Remove build/ and the venv
	rm -rf build $(VENV)
