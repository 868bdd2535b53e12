#!/usr/bin/env bash
# `make gpu-check`: bench/gpu_check.py on a CUDA machine in one command. With wheels in gpu-wheels/ (a machine
# without our packages: `make gpu-wheels` here, then carry that folder there) they are installed into
# /tmp/stylekit-site first; with a .venv (a workstation) that is used. Results go to $OUT when set (the device
# machine hands that folder back), else to bench/ (outputs/gpu_check_cpu/ for --cpu). Extra arguments go to gpu_check.py (--budget-s, --cases...).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export STYLEKIT_CACHE_DIR=${STYLEKIT_CACHE_DIR:-/tmp/stylekit-cache}
# Progress bars would fill the console the device tool hands back; gpu_check.log keeps stylekit's own log.
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
if [ -x .venv/bin/python ] && .venv/bin/python -c "import diffusers, hydra" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
  if compgen -G "gpu-wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stylekit-site \
      gpu-wheels/*.whl || { echo "gpu-check: installing gpu-wheels/*.whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/stylekit-site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${OUT:-}" ]; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  set -- --out-dir "$OUT" "$@"
fi
$PY -m bench.gpu_check "$@"
