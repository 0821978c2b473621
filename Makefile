# Entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Full BoolQ for `make demo-full`: a folder with train.jsonl and val.jsonl, or `hub` (google/boolq, online).
DATA_DIR ?= $(if $(wildcard ../shared/data/boolq/train.jsonl),../shared/data/boolq,hub)

.PHONY: demo up stack-services demo-full test test-fast lint format services compose-smoke

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The main job as users run it: the native stack (Redis, 2 API replicas, a worker, nginx on :4000), one training
# job through nginx (minilm on the bundled 400-row sample: too few rows to learn BoolQ, and the output says so),
# its accuracy against the majority class, one /predict answer; then the stack stops. `make up` keeps it running.
demo: $(BIN)/.installed stack-services
	HF_HUB_OFFLINE=1 $(BIN)/python -m app demo
	@echo "== Next: 'make up' keeps the stack running on localhost:4000 (console: http://localhost:4000/);"
	@echo "==       'make demo-full' trains on the full BoolQ train split and beats the majority baseline."

# The stack in the foreground until Ctrl-C: http://localhost:4000 (the console; /docs for the API).
up: $(BIN)/.installed stack-services
	HF_HUB_OFFLINE=1 $(BIN)/python -m app stack --replicas 2 --workers 1 --port 4000

# redis-server and nginx for the native stack: installed when we can (root + apt), else the one command to run.
stack-services:
	@bash .ci/services redis-server nginx

# The shortest measured run that beats the majority class by >= 3 points (bench/README.md "demo-full"):
# 2 epochs over the full train split. One epoch (half the time) measured only +1.6 points.
demo-full: $(BIN)/.installed
	@echo "== demo-full: minilm, 2 epochs over the full BoolQ train split ($(DATA_DIR))."
	@echo "== Expect about 7 minutes of training on 2 idle cores with native bf16 (~45 examples/s), roughly"
	@echo "== twice that without bf16 or on busy cores; then ~68 % val accuracy against 62.2 % for the majority class."
	HF_HUB_OFFLINE=$(if $(filter hub,$(DATA_DIR)),0,1) $(BIN)/python -m app train --model minilm \
	    --data-dir $(DATA_DIR) --epochs 2 --lr 1e-4 --warmup-ratio 0.1 --batch-size 32 --max-length 256

# ruff, and import-linter's contracts (pyproject.toml, .importlinter): the engine / service / ops / api layering.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo --no-cache pyproject.toml .importlinter

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The service tests need redis-server and nginx (and docker-compose to validate the compose file); the console's
# browser tests need chromium (driven by Playwright from requirements-dev.txt).
services:
	@bash .ci/services

# Everything, in TEST_WORKERS pytest processes (whole files each, so module fixtures stay together): most tests
# wait on servers and subprocesses, so two processes on 2 cores finish sooner than one. Installs the system
# services first when it can (root + apt). Each run lists its slowest tests, so a CI log shows where time went.
TEST_WORKERS ?= 2
test: services lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

# tests/unit: no service, no process of its own (torch runs in the test process), no model bigger than the tests'
# tiny BERT: a minute on any 2 cores (docs/development.md, "The unit tier's time").
test-fast: lint
	$(BIN)/python -m pytest tests/unit --durations=10

# Build the images and run the compose stack for real (Docker, or podman without a Docker daemon) and talk to it
# through nginx on localhost:4000; builds without a registry from local base images (README, "Deploy").
compose-smoke:
	deploy/compose-smoke.sh
