#!/usr/bin/env bash
# Every GPU measurement in one call, for a lent GPU machine or your own (needs: a CUDA jax,
# torch, and colorflax's dependencies, scikit-image for the seed-style PyTorch epoch; installs
# nothing from the network). Each measurement runs in its own process and records its peak
# device memory; the epoch runs also time the seed-style PyTorch pipeline on the same images.
#   bash launch/gpu_benchmark.sh [OUTDIR]      (default: benchmarks/gpu)
# Writes one JSON per setting and prints a table of each; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)'
python3 -c 'import flax, optax, orbax.checkpoint as o; print("flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__)'
bench() {
  name=$1; shift; echo "== $name"; local t=$SECONDS
  python3 -m colorflax.benchmark --config configs/default.py --json "$out/$name.json" "$@" 2>&1 \
    | grep -v -e '^WARNING' -e 'Given directory' || echo "!! $name failed"
  echo "   ($((SECONDS - t)) s)"
}
# The seed recipe's setting (256 px, batch 8) in float32 and bfloat16, with a real epoch over
# 7,000 images (the seed's data size) to extrapolate the 60-epoch recipe.
bench seed_f32_b8 --epoch_images=7000
bench seed_bf16_b8 --config.model.dtype=bfloat16 --epoch_images=7000
# Large batch in bf16: the hardware-limit (MFU) figure.
bench bf16_b128 --config.model.dtype=bfloat16 --config.batch_size=128 --config.steps_per_dispatch=4
