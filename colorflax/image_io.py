"""Decoding and resizing with Pillow: one function from a file (or bytes) to a uint8 RGB square.

Anything that cannot become a sane RGB image raises `SkipImage` with a short reason, which
precompute_features records in the manifest instead of failing the whole run.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')
RESIZE_MODES = ('squash', 'center_crop')  # data.resize
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
GRAY_TOLERANCE = 3  # max |R-G|, |G-B| (uint8) for a pixel to count as gray


class SkipImage(Exception):
  """This image cannot be used; str(e) is the reason recorded in the manifest."""


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):  # 16-bit (or 32-bit int) grayscale
    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if arr.max() > 255 or img.mode.startswith('I;16') else 255.0
    return Image.fromarray((np.clip(arr / top, 0, 1) * 255 + 0.5).astype(np.uint8)).convert('RGB')
  if img.mode == 'F':
    arr = np.asarray(img, np.float64)
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)).convert('RGB')
  if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))  # transparent -> white
    return Image.alpha_composite(background, rgba).convert('RGB')
  return img.convert('RGB')  # P, L, 1, CMYK, YCbCr, LAB, HSV, RGB


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
  if mode == 'squash':  # the prototype: any aspect squashed to a square, area filter
    return img.resize((size, size), Image.Resampling.BOX)
  if mode == 'center_crop':  # shorter side to `size`, then the central square
    return ImageOps.fit(img, (size, size), Image.Resampling.BOX)
  raise ValueError(f'unknown resize mode {mode!r}')


def is_grayscale(rgb: np.ndarray) -> bool:
  """True when (nearly) every pixel has R = G = B: no colour to learn from."""
  x = rgb.astype(np.int16)
  chroma = np.maximum(np.abs(x[..., 0] - x[..., 1]), np.abs(x[..., 1] - x[..., 2]))
  return float(np.percentile(chroma, 99)) <= GRAY_TOLERANCE


def load_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """A path, file object or bytes -> a full-size RGB Pillow image, EXIF orientation applied."""
  if isinstance(source, (bytes, bytearray)):
    if not source:
      raise SkipImage('empty file')
    source = io.BytesIO(source)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(source) as img:
        if img.width * img.height > max_pixels:
          raise SkipImage(f'too large to decode safely ({img.width}x{img.height} pixels)')
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
  except SkipImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise SkipImage(f'too large to decode safely ({e})') from None
  except Image.UnidentifiedImageError:
    raise SkipImage('not an image') from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise SkipImage(
        f'unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}'
    ) from None


def prepare(
    source, size: int, mode: str, skip_grayscale: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
  """Decode, orient, convert and resize: uint8 (size, size, 3), or SkipImage."""
  if isinstance(source, str):
    import os

    if os.path.getsize(source) == 0:
      raise SkipImage('empty file')
  img = load_rgb(source, max_pixels)
  out = np.asarray(resize(img, size, mode), np.uint8)
  if skip_grayscale and is_grayscale(out):
    raise SkipImage('grayscale (no colour to learn)')
  return out
