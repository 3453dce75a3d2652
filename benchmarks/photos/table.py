"""The table of compare.sh, in markdown: each run's `evaluate` on the held-out photographs (at
each temperature for the classification runs), and the grayscale baseline.

  python benchmarks/photos/table.py OUT RUN...
"""

import glob
import json
import os
import sys


def main(out, runs):
  print('| run | T | PSNR (dB) | SSIM | colourfulness | Δ colourfulness | FID |')
  print('|---|---|---|---|---|---|---|')
  m = None
  for run in runs:
    paths = glob.glob(os.path.join(out, run, 'heldout-*.json'))
    for path in sorted(paths, key=lambda p: p.rsplit('heldout-', 1)[1]):
      with open(path) as f:
        m = json.load(f)
      t = path.rsplit('heldout-', 1)[1][: -len('.json')]
      print(
          f"| {run} | {'' if t == 'default' else t} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
          f"{m['colorfulness']:.1f} | {m['delta_colorfulness']:+.1f} | {m['fid']:.0f} |"
      )
  if m is None:
    sys.exit(f'table.py: no heldout-*.json under {out} for {" ".join(runs)}')
  print(
      f"| grayscale (a = b = 0) | | {m['psnr_gray']:.2f} | {m['ssim_gray']:.4f} | "
      f"{m['colorfulness_gray']:.1f} | {m['colorfulness_gray'] - m['colorfulness_true']:+.1f} | "
      f"{m['fid_gray']:.0f} |"
  )
  print(
      f"\n{m['num_images']} held-out images; the truth's colourfulness "
      f"{m['colorfulness_true']:.1f}; FID on {m['fid_weights']}"
  )


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
