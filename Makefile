# stylekit — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help uv install test test-all lint format smoke bench gpu-wheels gpu-check demo deploy modal-check modal-clean clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

uv: # install uv when the machine lacks it (a fresh machine needs only Python 3.11 and make)
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

install: uv ## Install stylekit and its locked dependencies into .venv (uv sync from uv.lock)
	$(UV) sync --frozen

test: install ## Run the fast test suite (what CI runs): tiny models, CPU, offline
	$(RUN) pytest -m "not slow and not gpu and not modal and not hub" -q

test-all: install ## Run every test this machine can run, slow ones included
	$(RUN) pytest -m "not gpu and not modal and not hub" -q

lint: install ## ruff check + format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: install ## Apply ruff's formatting and safe fixes
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

smoke: install ## One tiny run per family on CPU: train 2 steps, then inpaint the demo photo with that LoRA
	@set -e; for m in tiny_flux tiny_sdxl tiny_qwen_edit; do \
	  out=outputs/smoke/$$m; rm -rf $$out; \
	  extra=""; if [ $$m = tiny_qwen_edit ]; then \
	    mkdir -p $$out/controls && cp assets/demo/train/*.jpg $$out/controls/ && extra="data.control_dir=$$out/controls"; fi; \
	  $(RUN) stylekit finetune model=$$m data.dataset_dir=assets/demo/train data.trigger=sks $$extra \
	    trainer.max_steps=2 logger=none trainer.resume=never trainer.checkpoint_root=$$out/checkpoints \
	    hydra.run.dir=$$out/train; \
	  $(RUN) stylekit inpaint model=$$m prompt="a sks cat" image=assets/demo/base/chelsea.jpg \
	    mask=assets/demo/masks/chelsea.png lora_weights=$$out/train/lora output_dir=$$out hydra.run.dir=$$out/inpaint; \
	done

bench: install ## Benchmarks: ratios against a baseline measured in the same run
	@if [ -d bench ]; then $(RUN) python -m bench; else echo "no benchmarks yet"; fi

gpu-wheels: uv ## Wheels a network-less CUDA machine lacks (diffusers, hydra, bitsandbytes...) into gpu-wheels/
	UV="$(UV)" PYTHON=$(PYTHON) bash bench/gpu_wheels.sh

gpu-check: ## On a CUDA machine: bench/gpu_check.py (< 8 min) -> bench/GPU_RESULTS.md + gpu_results.json
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

MODEL ?= tiny_flux
DEMO_STEPS ?= 40
demo: install ## The main job end to end: train a LoRA on the demo photos, inpaint a photo with it (outputs/demo/)
	rm -rf outputs/demo
	$(RUN) stylekit finetune model=$(MODEL) data.dataset_dir=assets/demo/train data.trigger=sks data.max_upscale=4 \
	  trainer.max_steps=$(DEMO_STEPS) trainer.validate_every=$(DEMO_STEPS) trainer.checkpoint_every=$(DEMO_STEPS) \
	  lora.rank=8 lora.alpha=8 optimizer.lr=1e-3 logger=none trainer.resume=never \
	  trainer.checkpoint_root=outputs/demo/checkpoints hydra.run.dir=outputs/demo/train
	$(RUN) stylekit inpaint model=$(MODEL) model.pipeline=inpaint prompt="a sks style cat" \
	  image=assets/demo/base/chelsea.jpg mask=assets/demo/masks/chelsea.png lora_weights=outputs/demo/train/lora \
	  inpaint/preprocess=grayscale save_comparison=true output_dir=outputs/demo hydra.run.dir=outputs/demo/inpaint
	@echo "LoRA: outputs/demo/train/lora  samples: outputs/demo/train/samples  before/after: outputs/demo/chelsea_comparison.png"

GPU ?=
APP ?=
deploy: install ## Deploy the warm Inpainter to Modal (GPU=H100 or "H100,A100-80GB"; APP=stylekit)
	$(RUN) stylekit modal deploy $(if $(GPU),--gpu "$(GPU)") $(if $(APP),--app "$(APP)")

modal-check: install ## Check Modal with your account: deploy, tiny sweep, edit with its LoRA, GPU probe, cost
	$(RUN) stylekit modal check

DAYS ?= 30
modal-clean: install ## List runs/checkpoints/.inputs older than DAYS on the outputs volume (YES=1 removes)
	$(RUN) stylekit modal clean --older-than $(DAYS) $(if $(YES),--yes)

clean: ## Remove outputs (every run, LoRA and checkpoint in it), caches and the virtualenv
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf multirun .pytest_cache .ruff_cache .stylekit-cache .venv
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
