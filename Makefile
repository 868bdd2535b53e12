# stylekit — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help uv install test test-all lint format smoke bench demo clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

uv: # install uv when the machine lacks it (a fresh machine needs only Python 3.11 and make)
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

install: uv ## Install stylekit and its locked dependencies into .venv (uv sync from uv.lock)
	$(UV) sync --frozen

test: install ## Run the fast test suite (what CI runs): tiny models, CPU, offline
	$(RUN) pytest -m "not slow and not gpu and not modal" -q

test-all: install ## Run every test this machine can run, slow ones included
	$(RUN) pytest -m "not gpu and not modal" -q

lint: install ## ruff check + format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: install ## Apply ruff's formatting and safe fixes
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

smoke: install ## One tiny run per family (train, then inpaint), on CPU
	@for m in tiny_flux tiny_sdxl tiny_qwen_edit; do \
	  $(RUN) python -m stylekit.models.tiny $${m#tiny_} .stylekit-cache/smoke/$$m >/dev/null || exit 1; \
	  echo "built $$m"; \
	done

bench: install ## Benchmarks: ratios against a baseline measured in the same run
	@if [ -d bench ]; then $(RUN) python -m bench; else echo "no benchmarks yet"; fi

demo: install ## The main job end to end on the tiny models (once training and inpainting exist)
	@echo "make demo: trains a LoRA on the tiny FLUX model and inpaints a photo with it; it arrives with the"
	@echo "training (issue #3) and inpainting (issue #4) work. Until then: make smoke builds the tiny models."

clean: ## Remove outputs, caches and the virtualenv
	rm -rf outputs multirun .pytest_cache .ruff_cache .stylekit-cache .venv
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
