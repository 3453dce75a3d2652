"""Colorize photos with a colorflax ONNX export, using only onnxruntime, NumPy and Pillow.

  python colorize.py MODEL_DIR INPUT [INPUT ...] --output OUT_DIR

MODEL_DIR is what `python -m colorflax.export` wrote (colorizer.onnx, colorizer.json; this file
is copied there as colorize.py). Each output keeps its input's size and lightness, as
`colorflax.colorize` does: the model's a*b* is upsampled onto the full-resolution L*, chroma
reduced where needed to stay inside sRGB. Standalone on purpose: it imports nothing of colorflax.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

# sRGB (D65) <-> CIE L*a*b*, as colorflax.color (skimage's constants).
RGB_FROM_XYZ = np.linalg.inv([[0.412453, 0.35758, 0.180423], [0.212671, 0.71516, 0.072169],
                              [0.019334, 0.119193, 0.950227]])  # fmt: skip
WHITE = np.array([0.95047, 1.0, 1.08883])


def lightness(gray):
  """L* of gray levels in [0, 1]."""
  y = np.where(gray > 0.04045, ((gray + 0.055) / 1.055) ** 2.4, gray / 12.92)
  return 116 * np.where(y > 0.008856, np.cbrt(y), 7.787 * y + 16 / 116) - 16


def linear_rgb(L, ab):
  fy = (L + 16) / 116
  f = np.stack([ab[..., 0] / 500 + fy, fy, np.maximum(fy - ab[..., 1] / 200, 0)], -1)
  return (np.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * WHITE) @ RGB_FROM_XYZ.T


def to_srgb(L, ab, steps=12):
  """uint8 sRGB of L* and a*b*, each pixel's chroma scaled down (bisection) into the gamut."""
  low, high = -1e-4 / 12.92, ((1 + 1e-4 + 0.055) / 1.055) ** 2.4
  inside = lambda s: np.all((linear_rgb(L, ab * s) >= low) & (linear_rgb(L, ab * s) <= high), -1)
  lo, hi = np.zeros(L.shape), np.ones(L.shape)
  for _ in range(steps):
    mid = (lo + hi) / 2
    good = inside(mid[..., None])
    lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
  rgb = linear_rgb(L, ab * np.where(inside(1.0), 1.0, lo)[..., None])
  rgb = np.where(
      rgb > 0.0031308, 1.055 * np.maximum(rgb, 0.0031308) ** (1 / 2.4) - 0.055, 12.92 * rgb
  )
  return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize(session, meta, path):
  """The colorized image (PIL, RGB) of the image file at `path`."""
  with Image.open(path) as img:
    rgb = np.asarray(ImageOps.exif_transpose(img).convert('RGB'), np.float32) / 255
  gray = rgb @ np.float32(meta['gray_weights'])  # colour or not: the luminance grayscale
  gray8 = Image.fromarray((gray * 255 + 0.5).astype(np.uint8))
  s = meta['size']
  square = gray8.resize((s, s), Image.BOX)  # the model sees the whole image, squashed
  crop = square if meta['resize'] == 'squash' else ImageOps.fit(gray8, (s, s), Image.BOX)
  feeds = {
      'gray': np.asarray(square, np.float32)[None, :, :, None] / 255,
      'inception_gray': np.asarray(crop, np.float32)[None, :, :, None] / 255,
  }
  if 'hints' in meta['inputs']:  # none given: all zeros
    feeds['hints'] = np.zeros((1, s, s, 3), np.float32)
  ab = session.run(['ab'], feeds)[0][0]  # (s, s, 2), Lab units
  h, w = gray.shape
  up = [Image.fromarray(ab[..., c], 'F').resize((w, h), Image.BILINEAR) for c in range(2)]
  return Image.fromarray(to_srgb(lightness(gray), np.stack(up, -1).astype(np.float64)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model_dir')
  parser.add_argument('inputs', nargs='+')
  parser.add_argument('--output', required=True)
  args = parser.parse_args()
  with open(os.path.join(args.model_dir, 'colorizer.json')) as f:
    meta = json.load(f)
  session = ort.InferenceSession(os.path.join(args.model_dir, 'colorizer.onnx'))
  os.makedirs(args.output, exist_ok=True)
  failed = 0
  for path in args.inputs:
    out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + '.png')
    try:
      colorize(session, meta, path).save(out)
      print(out)
    except (OSError, ValueError) as e:  # not an image, unreadable, cut off
      print(f'skipped {path}: {e}', file=sys.stderr)
      failed += 1
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
