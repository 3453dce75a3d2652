"""The sample grid of compare.sh: a column per held-out photograph (its central crop), rows
grayscale | each run's `colorize` output | truth, 128 px a cell.

  python benchmarks/photos/grid.py OUT RUN...     # writes OUT/samples.jpg
"""

import glob
import os
import sys

from PIL import Image

CELL = 128


def main(out, runs):
  centres = os.path.join(out, 'centres')
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(centres, '*.png')))
  colorized = [(run, os.path.join(out, run, 'colorized', 'centres')) for run in runs]
  rows = [('grayscale', centres), *colorized, ('truth', centres)]
  grid = Image.new('RGB', (CELL * len(names), CELL * len(rows)))
  for y, (kind, folder) in enumerate(rows):
    for x, name in enumerate(names):
      with Image.open(os.path.join(folder, name)) as image:
        image = image.convert('L' if kind == 'grayscale' else 'RGB')
        cell = image.convert('RGB').resize((CELL, CELL), Image.LANCZOS)
      grid.paste(cell, (x * CELL, y * CELL))
  path = os.path.join(out, 'samples.jpg')
  grid.save(path, quality=90)
  print(f'{path}: rows {", ".join(kind for kind, _ in rows)}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
