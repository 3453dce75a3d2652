"""A development set of real colour photographs, built from Debian packages (the only network this
project has) and scikit-image's sample photographs, for choosing configs/photos.py:

  python benchmarks/photos/devset.py OUT      # OUT/train/*.png, OUT/heldout/*.png, OUT/SOURCES.csv

Each photograph of PHOTOS is fetched with `apt-get download` and unpacked with `dpkg -x` (no root
needed), its licence read from the package's copyright file (the stanza whose Files pattern names
it), and cut into CROPS square crops of 256 px: the whole frame's central square, then a 3x3 grid
over the frame scaled to 512 px on its shorter side, so that a few dozen photographs give a few
hundred training images. Photographs, not crops, are split: every fourth one (in PHOTOS' order)
is held out, so no held-out crop shares a scene with a training one.

Never used, here or anywhere in this project's development: gcompris-qt-data, mate-backgrounds,
plasma-workspace-wallpapers and the OpenCV documentation packages, an independent test set.
"""

import csv
import fnmatch
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

# (Debian package, the photograph's file name in it): the packages' photographs, chosen by eye
# from their contact sheets (their other images are drawings, renders, patterns and logos).
PHOTOS = [
    ('lomiri-wallpapers-16.04', 'aitzgorri_by_Aitzol_Berasategi.jpg'),
    ('lomiri-wallpapers-16.04', 'Bridge_by_Sander_Klootwijk.jpg'),
    ('lomiri-wallpapers-16.04', 'Dragonfly_by_Bolly.jpg'),
    ('lomiri-wallpapers-16.04', 'friends_by_Aitzol_Berasategi.jpg'),
    ('lomiri-wallpapers-16.04', 'life_by_Aitzol_Berasategi.jpg'),
    ('lomiri-wallpapers-16.04', 'picosdeeuropa_by_Aitzol_Berasategi.jpg'),
    ('lomiri-wallpapers-16.04', 'Picture_0B_by_freespace.jpg'),
    ('lomiri-wallpapers-16.04', 'Picture_1A_by_freespace.jpg'),
    ('lomiri-wallpapers-16.04', 'seeding_by_Clements_Engelhardt.jpg'),
    ('lomiri-wallpapers-16.04', 'sunset_by_Aitzol_Berasategi.jpg'),
    ('lomiri-wallpapers-16.04', 'umang_by_Abhishek_Mudgal.jpg'),
    ('lomiri-wallpapers-16.04', 'Wine_by_Jakkub_Mede.jpg'),
    ('lomiri-wallpapers-16.04', 'analogpattern_by_Peter_Nerlich.jpg'),
    ('lomiri-wallpapers-20.04', 'Kleiber_by_Lukas_Baubkus.jpg'),
    ('palapeli-data', 'castle-maintenon.jpg'),
    ('palapeli-data', 'cincinnati-bridge.jpg'),
    ('palapeli-data', 'citrus-fruits.jpg'),
    ('palapeli-data', 'european-honey-bee.jpg'),
    ('palapeli-data', 'panther-chameleon-female.jpg'),
    ('palapeli-data', 'Rear-Admiral-Diplomat-1.jpg'),
    ('palapeli-data', 'Time-For-Lunch-2.jpg'),
    ('palapeli-data', 'Eliminator-Funk-2.jpg'),
    ('palapeli-data', 'gon-defends-the-critters-1.jpg'),
    ('palapeli-data', 'mahogany-handjob-1.jpg'),
]
# scikit-image's bundled photographs (skimage.data) and their licences (its data/README).
SKIMAGE = {
    'astronaut': 'public domain (NASA)',
    'chelsea': 'CC0',
    'coffee': 'CC0',
    'rocket': 'public domain (NASA)',
}
EXCLUDED = ('gcompris-qt-data', 'mate-backgrounds', 'plasma-workspace-wallpapers', 'opencv-doc')
CROP, GRID = 256, 3
CROPS = 1 + GRID * GRID


def unpack(package, folder):
  """The package unpacked into folder/package (apt-get download, dpkg -x)."""
  assert not package.startswith(EXCLUDED), package
  target = os.path.join(folder, package)
  if not os.path.isdir(target):
    subprocess.run(['apt-get', 'download', package], cwd=folder, check=True, capture_output=True)
    [deb] = glob.glob(os.path.join(folder, f'{package}_*.deb'))
    subprocess.run(['dpkg', '-x', deb, target], check=True)
  return target


def licence(root, package, name):
  """The licence the package's copyright file gives `name` (DEP-5): the stanza whose Files
  pattern names it, else the one for every file ('Files: *')."""
  path = os.path.join(root, 'usr', 'share', 'doc', package, 'copyright')
  named, everything = None, 'see the package'
  with open(path, encoding='utf-8', errors='replace') as f:
    for stanza in f.read().split('\n\n'):
      fields = dict(
          line.split(':', 1)
          for line in stanza.splitlines()
          if ':' in line[:20] and not line.startswith(' ')
      )
      if 'License' not in fields:
        continue
      for pattern in fields.get('Files', '').split():
        if pattern == '*':
          everything = fields['License'].strip()
        elif os.path.basename(pattern) != '*' and fnmatch.fnmatch(name, os.path.basename(pattern)):
          named = fields['License'].strip()
  return named or everything


def crops(image):
  """CROPS uint8 crops of CROP px: the central square, then a GRID x GRID grid over the frame
  with its shorter side at 2 x CROP."""
  out = [np.asarray(image.resize((CROP, CROP), Image.Resampling.BOX, box=_square(image)))]
  scale = 2 * CROP / min(image.size)
  big = image.resize([round(s * scale) for s in image.size], Image.Resampling.BOX)
  w, h = big.size
  for i in range(GRID):
    for j in range(GRID):
      x, y = (w - CROP) * j // (GRID - 1), (h - CROP) * i // (GRID - 1)
      out.append(np.asarray(big.crop((x, y, x + CROP, y + CROP))))
  return out


def _square(image):
  w, h = image.size
  s = min(w, h)
  return ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)


def sources(folder):
  """(name, PIL image, where it came from, its licence) for every photograph."""
  from skimage import data

  for package, name in PHOTOS:
    root = unpack(package, folder)
    [path] = glob.glob(os.path.join(root, '**', name), recursive=True)
    yield name, Image.open(path).convert('RGB'), package, licence(root, package, name)
  for name, terms in SKIMAGE.items():
    yield f'{name}.png', Image.fromarray(getattr(data, name)()).convert(
        'RGB'
    ), 'scikit-image', terms


def main(out):
  for split in ('train', 'heldout'):
    os.makedirs(os.path.join(out, split), exist_ok=True)
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    for k, (name, image, origin, terms) in enumerate(sources(folder)):
      split = 'heldout' if k % 4 == 3 else 'train'
      stem = os.path.splitext(name)[0]
      for c, crop in enumerate(crops(image)):
        Image.fromarray(crop).save(os.path.join(out, split, f'{stem}_{c}.png'))
      rows.append((name, origin, terms, split, image.size[0], image.size[1]))
  with open(os.path.join(out, 'SOURCES.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([('photograph', 'from', 'licence', 'split', 'width', 'height')] + rows)
  held = sum(r[3] == 'heldout' for r in rows)
  print(
      f'{len(rows)} photographs ({len(rows) - held} train, {held} held out), {CROPS} crops each, '
      f'in {out}; their sources and licences: {out}/SOURCES.csv'
  )


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'photos')
