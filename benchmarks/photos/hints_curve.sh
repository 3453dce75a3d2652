#!/usr/bin/env bash
# The README's colour-hints table: PSNR on the development set's held-out photographs against
# the number of hints revealed from the truth (evaluate --hints N), for a model trained with
# hints and for the plain model trained the same way (at 0 hints).
#
#   PYTHON=.venv/bin/python bash benchmarks/photos/hints_curve.sh [PHOTOS=photos] [OUT=runs/photos] [LOSS=mse]
#
# Run benchmarks/photos/compare.sh first: it builds the caches and the Inception weights, and
# trains the plain run OUT/LOSS, which this script reuses. A finished run is not trained again.
set -euo pipefail
PHOTOS=${1:-photos}
OUT=${2:-runs/photos}
LOSS=${3:-mse}
PY=${PYTHON:-python}
CONFIG=configs/photos.py
WEIGHTS=${WEIGHTS:-$OUT/inception.pth}
[ -f "$OUT/cache/heldout/manifest.json" ] || {
  echo "hints_curve.sh: no $OUT/cache/heldout: run benchmarks/photos/compare.sh first" >&2
  exit 2
}
PLAIN=$OUT/$LOSS
HINTED=$OUT/$LOSS-hints
[ -f "$PLAIN/done" ] || bash benchmarks/photos/compare.sh "$PHOTOS" "$OUT" "$LOSS"
[ -f "$HINTED/done" ] || {
  $PY -m colorflax.train --config $CONFIG --workdir "$HINTED" \
    --config.data.source="$PHOTOS/train" --config.data.cache_dir="$OUT/cache/train" \
    --config.features.inception_weights="$WEIGHTS" --config.loss="$LOSS" --config.ema_decay=0 \
    --config.model.hints=true
  touch "$HINTED/done"
}
held_out=(--split all --nofid --config.data.source="$PHOTOS/heldout"
  --config.data.cache_dir="$OUT/cache/heldout")
$PY -m colorflax.evaluate --workdir "$PLAIN" "${held_out[@]}" --json "$PLAIN/hints-0.json" > /dev/null
for n in 0 1 2 5 10 20; do
  $PY -m colorflax.evaluate --workdir "$HINTED" "${held_out[@]}" --hints $n \
    --json "$HINTED/hints-$n.json" > /dev/null
done
$PY - "$PLAIN" "$HINTED" << 'EOF'
import json, sys
plain, hinted = sys.argv[1:]
read = lambda path: json.load(open(path))
base = read(f'{plain}/hints-0.json')
print('| hints | PSNR, hints model (dB) | vs. none | PSNR, plain model (dB) |')
print('|---|---|---|---|')
zero = read(f'{hinted}/hints-0.json')['psnr']
for n in (0, 1, 2, 5, 10, 20):
  psnr = read(f'{hinted}/hints-{n}.json')['psnr']
  plain_cell = f"{base['psnr']:.2f}" if n == 0 else ''
  print(f'| {n} | {psnr:.2f} | {psnr - zero:+.2f} | {plain_cell} |')
print(f"grayscale: {base['psnr_gray']:.2f} dB; {base['num_images']} held-out crops")
EOF
