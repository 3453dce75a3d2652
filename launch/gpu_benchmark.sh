#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call, for a lent GPU machine or your own (needs: a CUDA jax,
# torch, and colorflax's dependencies, scikit-image for the seed-style PyTorch epoch; installs
# nothing from the network). Each measurement runs in its own process and records its peak
# device memory; the epoch runs also time the seed-style PyTorch pipeline on the same images.
#   bash launch/gpu_benchmark.sh [OUTDIR] [BENCHMARK FLAGS...]   (default OUTDIR: $OUT, else benchmarks/gpu)
#   DRY_RUN=1 bash launch/gpu_benchmark.sh     # print the benchmark commands only
#   STAGES="bf16_b128 recipe_bf16_b8" bash launch/gpu_benchmark.sh   # these settings only
# Flags given after OUTDIR are appended to every command, where they win over the script's own:
# e.g. `--config.data.image_size=128` on a smaller GPU, or a rehearsal on any machine, which
# runs the same code paths in about 6 minutes on a 2-core CPU (the whole run in every setting there):
#   bash launch/gpu_benchmark.sh /tmp/rehearsal --config.data.image_size=32 --repeats=1 \
#     --epoch_images=352 --seed_epoch_images=16 --recipe_epochs=2
#   (with STAGES="seed_f32_b8 seed_bf16_b8 bf16_b128 recipe_bf16_b8" for all four)
# Writes one JSON per setting and prints a table of each; see BENCHMARKS.md. By default the first
# three settings (about 6 minutes on an H200); the fourth, the whole 60-epoch seed recipe timed
# from start to end (about 4 more), runs when STAGES names it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu}
if [ $# -gt 0 ] && [[ $1 != -* ]]; then out=$1; shift; fi
extra=("$@")
all_stages="seed_f32_b8 seed_bf16_b8 bf16_b128 recipe_bf16_b8"
STAGES=${STAGES:-seed_f32_b8 seed_bf16_b8 bf16_b128}
for stage in $STAGES; do
  if [[ " $all_stages " != *" $stage "* ]]; then
    echo "gpu_benchmark.sh: STAGES: unknown setting '$stage'; the settings are: $all_stages" >&2
    exit 2
  fi
done
# DRY_RUN prints each command as shell words, so an argument with a space reads back as one.
echo_quoted() { local s; printf -v s '%q ' "$@"; echo "${s% }"; }
bench() {
  name=$1; shift
  if [[ " $STAGES " != *" $name "* ]]; then return; fi
  local cmd=(python3 -m colorflax.benchmark --config configs/default.py --json "$out/$name.json" "$@" ${extra[@]+"${extra[@]}"})
  if [ -n "${DRY_RUN:-}" ]; then echo_quoted "${cmd[@]}"; return; fi
  echo "== $name"; local t=$SECONDS
  "${cmd[@]}" 2>&1 | grep -v -e '^WARNING' -e 'Given directory' || echo "!! $name failed"
  echo "   ($((SECONDS - t)) s)"
}
if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)'
  python3 -c 'import flax, optax, orbax.checkpoint as o; print("flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__)'
fi
# The seed recipe's setting (256 px, batch 8) in float32 and bfloat16, with a real epoch over
# 7,000 images (the seed's data size) to extrapolate the 60-epoch recipe. The seed-style
# PyTorch epoch is bound by its host pipeline (~11 ms per 256 px image for the affine warp and
# scikit-image's Lab on one core), so 1,600 of its images give its rate in ~20 s instead of ~60.
bench seed_f32_b8 --epoch_images=7000 --seed_epoch_images=1600
bench seed_bf16_b8 --config.model.dtype=bfloat16 --epoch_images=7000 --seed_epoch_images=1600
# Large batch in bf16: the hardware-limit (MFU) figure.
bench bf16_b128 --config.model.dtype=bfloat16 --config.batch_size=128 --config.steps_per_dispatch=4
# The whole seed recipe, timed from start to end rather than extrapolated from one epoch: 60
# epochs of the 7,000 images in bf16 (about 4 minutes on an H200). Only when STAGES names it.
bench recipe_bf16_b8 --config.model.dtype=bfloat16 --notorch --repeats=1 --epoch_images=7000 --recipe_epochs=60
