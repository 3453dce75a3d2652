"""The README's reference-photo picture: held-out photographs colorized by a compare.sh run with
their own embedding and with each of a few training photographs as `colorize --reference`.

  python benchmarks/photos/reference_grid.py PHOTOS OUT RUN     # writes OUT/reference.jpg

Top row: the references; then a row per photograph: grayscale | its own embedding | each
reference's.
"""

import os
import subprocess
import sys

from PIL import Image

CELL = 160
INPUTS = ('rocket_0.png', 'cincinnati-bridge_0.png')
REFERENCES = (
    'sunset_by_Aitzol_Berasategi_0.png',
    'citrus-fruits_0.png',
    'picosdeeuropa_by_Aitzol_Berasategi_0.png',
)


def colorize(workdir, output, inputs, reference=None):
  cmd = [sys.executable, '-m', 'colorflax.colorize', f'--workdir={workdir}', f'--output={output}']
  cmd += [f'--reference={reference}'] if reference else []
  subprocess.run(cmd + list(inputs), check=True, stdout=subprocess.DEVNULL)


def cell(path, gray=False):
  with Image.open(path) as image:
    return image.convert('L' if gray else 'RGB').convert('RGB').resize((CELL, CELL), Image.LANCZOS)


def main(photos, out, run):
  workdir, folder = os.path.join(out, run), os.path.join(out, 'reference', run)
  inputs = [os.path.join(out, 'centres', name) for name in INPUTS]
  refs = [os.path.join(photos, 'train', name) for name in REFERENCES]
  colorize(workdir, os.path.join(folder, 'own'), inputs)
  for i, ref in enumerate(refs):
    colorize(workdir, os.path.join(folder, str(i)), inputs, ref)
  grid = Image.new('RGB', (CELL * (2 + len(refs)), CELL * (1 + len(inputs))), 'white')
  for j, ref in enumerate(refs):
    grid.paste(cell(ref), ((2 + j) * CELL, 0))
  for i, (name, path) in enumerate(zip(INPUTS, inputs)):
    y = (1 + i) * CELL
    grid.paste(cell(path, gray=True), (0, y))
    grid.paste(cell(os.path.join(folder, 'own', name)), (CELL, y))
    for j in range(len(refs)):
      grid.paste(cell(os.path.join(folder, str(j), name)), ((2 + j) * CELL, y))
  path = os.path.join(out, 'reference.jpg')
  grid.save(path, quality=90)
  print(path)


if __name__ == '__main__':
  main(*sys.argv[1:4])
