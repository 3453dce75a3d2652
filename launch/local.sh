#!/usr/bin/env bash
# One machine, all of its devices (CPU, one or several GPUs, or a single TPU VM host):
# build the features cache, train, and evaluate the best checkpoint.
#
#   bash launch/local.sh CONFIG WORKDIR [--config.x=value ...]
#   DRY_RUN=1 bash launch/local.sh configs/default.py workdirs/seed    # print the commands only
#
# Needs: colorflax installed with the 'features' extra (pip install -e '.[features]'; add
# '.[cuda]' for NVIDIA GPUs). Every JAX device the process sees is used: restrict GPUs with
# CUDA_VISIBLE_DEVICES. The overrides apply to every step, so the cache and the model agree.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.x=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# DRY_RUN prints each command as shell words, so an argument with a space reads back as one.
echo_quoted() { local s; printf -v s '%q ' "$@"; echo "${s% }"; }
run() { if [ -n "${DRY_RUN:-}" ]; then echo_quoted "$@"; else "$@"; fi; }
run python -m colorflax.precompute_features --config "$config" "$@"
run python -m colorflax.train --config "$config" --workdir "$workdir" "$@"
run python -m colorflax.evaluate --workdir "$workdir" --samples 8 --json "$workdir/eval.json" "$@"
