#!/usr/bin/env bash
# `make gpu-wheels`: the wheels a CUDA machine without network needs beside its own torch, transformers, peft
# and accelerate (Python 3.12, x86-64), at the versions uv.lock pins, into gpu-wheels/ (git-ignored, except its
# README). antlr4-python3-runtime has only an sdist on PyPI, so its (pure-Python) wheel is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV=${UV:-uv}
DEST=gpu-wheels
# What the GPU image lacks; everything else stylekit imports is there (diffusers needs importlib_metadata only
# before Python 3.8).
WANTED="diffusers hydra-core omegaconf antlr4-python3-runtime bitsandbytes prodigyopt platformdirs"

pins=$($UV export --frozen --no-hashes --no-dev --no-emit-project 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' | cut -d' ' -f1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for name in $WANTED; do
  pin=$(grep -iE "^${name}==" <<<"$pins" || true)
  if [ -z "$pin" ]; then echo "gpu-wheels: $name is not in uv.lock" >&2; exit 1; fi
  if [ "$name" = antlr4-python3-runtime ]; then
    $PYTHON -m pip wheel -q --no-deps --no-binary :all: -w "$stage" "$pin"
  else
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$stage" "$pin"
  fi
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the install there
mv "$stage"/*.whl "$DEST"/
ls -l "$DEST"/*.whl | awk '{printf "  %6.1f MB  %s\n", $5 / 1e6, $9}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu-wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1048576)) MiB (the device carry limit is 64 MiB for everything)"
