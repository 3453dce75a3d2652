#!/usr/bin/env bash
# The README's "Real photographs" table: configs/photos.py trained with each loss on the
# development set's training photographs, evaluated on its held-out ones (other scenes).
#
#   PYTHON=.venv/bin/python bash benchmarks/photos/compare.sh [PHOTOS=photos] [OUT=runs/photos] [RUNS...]
#
# RUNS (default: all): mse, l1, huber, classification, classification-ema (ema_decay 0.99),
# classification-flat (no rebalancing). Prints the table (benchmarks/photos/table.py) and writes
# OUT/samples.jpg (benchmarks/photos/grid.py). A finished run is not trained again.
#
# Offline (no ImageNet weights), every cache is built with one Inception-v3: random weights
# whose BatchNorm statistics are calibrated on the training photographs, saved as a .pth, so
# that the held-out features come from the very network the training ones did.
set -euo pipefail
PHOTOS=${1:-photos}
OUT=${2:-runs/photos}
shift $(($# < 2 ? $# : 2))
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(mse l1 classification classification-ema classification-flat)
PY=${PYTHON:-python}
CONFIG=configs/photos.py

# RUN -> its overrides of configs/photos.py.
overrides() {
  case $1 in
    mse | l1 | huber) echo "--config.loss=$1 --config.ema_decay=0" ;;
    classification) echo "--config.loss=classification --config.ema_decay=0" ;;
    classification-ema) echo "--config.loss=classification --config.ema_decay=0.99" ;;
    classification-flat)
      echo "--config.loss=classification --config.ema_decay=0 --config.classification.rebalance=1"
      ;;
    *)
      echo "compare.sh: unknown run $1" >&2
      return 2
      ;;
  esac
}
for run in "${RUNS[@]}"; do overrides "$run" > /dev/null; done

[ -d "$PHOTOS/heldout" ] || $PY benchmarks/photos/devset.py "$PHOTOS"
mkdir -p "$OUT"

WEIGHTS=${WEIGHTS:-$OUT/inception.pth}
if [ ! -f "$WEIGHTS" ]; then
  $PY -m colorflax.precompute_features --config $CONFIG --config.data.source="$PHOTOS/train" \
    --config.data.cache_dir="$OUT/cache/calibration" --config.features.inception_weights=random
  $PY - "$OUT/cache/calibration" "$WEIGHTS" << 'EOF'
import sys, torch
from colorflax import features_cache, inception
cache = features_cache.open_cache(sys.argv[1])
model, _ = inception.load_for_cache(cache.manifest, cache.directory)
torch.save({k: v.cpu() for k, v in model.state_dict().items()}, sys.argv[2])
EOF
fi
for split in train heldout; do
  [ -f "$OUT/cache/$split/manifest.json" ] || $PY -m colorflax.precompute_features \
    --config $CONFIG --config.data.source="$PHOTOS/$split" \
    --config.data.cache_dir="$OUT/cache/$split" --config.features.inception_weights="$WEIGHTS"
done
# One central crop per held-out photograph, for the sample grid.
mkdir -p "$OUT/centres"
cp "$PHOTOS"/heldout/*_0.png "$OUT/centres/"

for run in "${RUNS[@]}"; do
  [ -f "$OUT/$run/done" ] || {
    # shellcheck disable=SC2046
    $PY -m colorflax.train --config $CONFIG --workdir "$OUT/$run" \
      --config.data.source="$PHOTOS/train" --config.data.cache_dir="$OUT/cache/train" \
      --config.features.inception_weights="$WEIGHTS" $(overrides "$run")
    touch "$OUT/$run/done"
  }
  temperatures=(default)
  case $run in classification*) temperatures=(0.2 0.38 0.6 1.0) ;; esac
  for t in "${temperatures[@]}"; do
    args=()
    [ "$t" = default ] || args=(--temperature "$t")
    $PY -m colorflax.evaluate --workdir "$OUT/$run" --split all "${args[@]}" \
      --config.data.source="$PHOTOS/heldout" --config.data.cache_dir="$OUT/cache/heldout" \
      --json "$OUT/$run/heldout-$t.json" | tee "$OUT/$run/heldout-$t.txt"
  done
  # The photographs as a user gets them: colorize at the crops' own 256 px (colour predicted at
  # the run's 64 px, under the full-resolution lightness), at the config's temperature.
  $PY -m colorflax.colorize --workdir "$OUT/$run" --output "$OUT/$run/colorized" "$OUT/centres" \
    --skip_existing
done

$PY benchmarks/photos/grid.py "$OUT" "${RUNS[@]}"
$PY benchmarks/photos/table.py "$OUT" "${RUNS[@]}"
