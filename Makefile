# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format compose-smoke

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# Fine-tune the offline model (minilm) on the bundled BoolQ sample and print accuracy; no server needed.
demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m app train --model minilm --batch-size 16 --lr 1e-4 --epochs 2

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

# Build the images and run the compose stack for real (Docker, or podman without a Docker daemon) and talk to it
# through nginx on localhost:4000; builds without a registry from local base images (README, "Deploy").
compose-smoke:
	deploy/compose-smoke.sh
