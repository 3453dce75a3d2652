"""Colour for one image (or video frame) at a time: the model and Inception of one workdir
(`Colorizer`), and the full-resolution work around them.

Each image is shrunk to the model's working size, which gives the model its L input and
Inception its feature (computed here, in torch, with the settings the training cache recorded).
The predicted ab is upsampled to the original resolution and recombined with the original
full-resolution L (`recombine`), so the output keeps the input's size and detail; chroma is
reduced where needed to stay inside the sRGB gamut, so L is kept.
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from colorflax import checkpoints, color, distributed, features_cache, hints, image_io
from colorflax import model as model_lib
from colorflax.errors import UserError

# The full-resolution work is per pixel, so it runs on flat runs of at most this many pixels,
# each padded to a power of two: images of every size share a few compilations, and nothing
# runs op by op (eagerly, a 12-megapixel photo took 25 s, nearly all of it the gamut fit).
_CHUNK_PIXELS = 1 << 20


def _per_pixel(fn, *images):
  """`fn` (jitted, on (N, C) pixels) applied to (H, W, C) images' pixels -> (H, W, C_out)."""
  h, w = images[0].shape[:2]
  n = h * w
  flat = [np.reshape(x, (n, -1)) for x in images]
  chunk = min(_CHUNK_PIXELS, 1 << max(n - 1, 1).bit_length())
  outputs = []
  for start in range(0, n, chunk):
    parts = [x[start : start + chunk] for x in flat]
    pad = chunk - len(parts[0])
    outputs.append(fn(*(np.pad(p, ((0, pad), (0, 0))) for p in parts)))  # dispatched, not awaited
  return np.concatenate([np.asarray(o) for o in outputs])[:n].reshape(h, w, -1)


@jax.jit
def _gray_and_lightness(rgb):
  """uint8 sRGB (N, 3) -> (N, 2): its grayscale in [0, 1] and that grayscale's L*."""
  gray = color.rgb_to_gray(color.uint8_to_unit(rgb))
  return jnp.stack([gray, color.rgb_to_lab(jnp.repeat(gray[:, None], 3, axis=-1))[:, 0]], axis=-1)


@jax.jit
def _lab_to_srgb_uint8(l, ab):
  """L* (N, 1), predicted a*b* (N, 2) -> uint8 sRGB (N, 3), chroma reduced into the gamut."""
  rgb = color.lab_to_rgb(jnp.concatenate([l, color.fit_ab_to_gamut(l, ab)], axis=-1))
  return (rgb * 255 + 0.5).astype(jnp.uint8)


def gray_and_lightness(rgb):
  """uint8 RGB (H, W, 3) -> (its grayscale in [0, 1] (H, W), that grayscale's L* (H, W))."""
  gray_and_l = _per_pixel(_gray_and_lightness, np.asarray(rgb))
  return gray_and_l[..., 0], gray_and_l[..., 1]


def full_res_gray(path):
  """(full-resolution grayscale in [0,1] (H, W), its L* (H, W)) from any image file."""
  return gray_and_lightness(image_io.load_rgb(path))


class Colorizer:
  """Model + Inception for one workdir; `colorize_batch(grays)` -> each image's predicted ab."""

  def __init__(
      self, workdir, config, which='best', size=0, inception_weights=None, temperature=None
  ):
    from colorflax import inception, losses

    self.size = size or config.data.image_size
    if self.size <= 0 or self.size % 8:
      raise UserError(f'--size must be a positive multiple of 8, got {self.size}')
    mesh = distributed.data_mesh()
    self.model, self.variables, self.step = checkpoints.restore_for_inference(
        workdir, config, which, mesh
    )
    # The features the model was trained on: the training cache's record, unless overridden.
    # A convert_torch workdir has no cache: its config says the seed's (ImageNet logits).
    cache_dir = os.path.expanduser(config.data.cache_dir)
    manifest = features_cache.read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is None and inception_weights is None:
      inception_weights = config.features.inception_weights
    self.inception, self.weights = inception.load_for_cache(manifest, cache_dir, inception_weights)
    self.kind = config.features.kind
    self.resize = config.data.resize
    self.objective = objective = losses.objective(config, temperature=temperature)
    self._predict = model_lib.make_predict(self.model, objective)
    self.reference = None  # use_reference: one embedding (1, D) for every image

  def use_reference(self, path):
    """Every image and video frame gets the global embedding of the photo at `path`, so that
    its scene steers the colours."""
    try:
      self.reference = self.embed_reference(path)
    except (image_io.SkipImage, OSError) as e:
      raise UserError(f'--reference {path}: {e}') from None

  def embed_reference(self, path):
    """The embedding (1, D) of the photo at `path`, colour or not: Inception sees its grayscale,
    as it saw the training images. image_io.SkipImage or OSError if it cannot be read."""
    if os.path.getsize(path) == 0:
      raise image_io.SkipImage('empty file')
    gray, _ = full_res_gray(path)
    return self._inception_embed([self.working_images(gray)[1]])

  def working_images(self, gray):
    """Full-res grayscale (H, W) in [0, 1] -> (the model's input, Inception's input), uint8.

    Both are the training cache's view of the image when it is a square. Otherwise the model
    must see the whole frame, or its colours would not line up once upsampled onto it: a
    `center_crop` run (shorter side to the size, then a crop) gets the uncropped image at that
    scale, sides rounded to multiples of 8, as the model is convolutional; Inception still gets
    the crop its features were made from."""
    img = Image.fromarray((gray * 255 + 0.5).astype(np.uint8))
    square = np.asarray(image_io.resize(img, self.size, self.resize), np.uint8)
    if self.resize == 'squash':
      return square, square
    whole = img.resize(self.working_size(img.size), Image.Resampling.BOX)
    return np.asarray(whole, np.uint8), square

  def working_size(self, image_size):
    """(w, h) of the model's input (working_images) for an image of `image_size` (W, H)."""
    if self.resize == 'squash':
      return self.size, self.size
    scale = self.size / min(image_size)
    return tuple(max(8, round(side * scale / 8) * 8) for side in image_size)

  def embed(self, squares):
    """Inception's inputs (uint8 grayscale squares, from working_images) -> embeddings (B, D)."""
    if self.reference is not None:
      return np.repeat(self.reference, len(squares), axis=0)
    return self._inception_embed(squares)

  def _inception_embed(self, squares):
    from colorflax import inception

    return inception.embed(self.inception, inception.preprocess(np.stack(squares)), self.kind)

  def hint_channels(self, points, gray, path):
    """colorflax.hints' channels (1, h, w, 3) of user `points` (hints.read_points) on the working
    grid of the full-res grayscale `gray`; UserError if a point is off the image (`path` names
    it)."""
    image_size = gray.shape[::-1]
    return hints.points_for(points, path, image_size, self.working_size(image_size))

  def colorize_batch(self, grays, embeddings=None, hint_channels=None, temperature=None):
    """Full-res grayscale images (list of (H, W)) -> each one's predicted ab/128 at its working
    size. `embeddings` (B, D): the global features to use instead of the images' own;
    `hint_channels`: each image's colour hints (`hint_channels`; None: none); `temperature`: a
    classification model's, for this call (None: the one the Colorizer was made with)."""
    inputs, squares = zip(*(self.working_images(g) for g in grays))
    emb = self.embed(squares) if embeddings is None else np.asarray(embeddings, np.float32)
    by_shape = collections.defaultdict(
        list
    )  # one batch per input shape (eval mode: images are independent)
    for i, x in enumerate(inputs):
      by_shape[x.shape].append(i)
    ab = [None] * len(grays)
    for rows in by_shape.values():
      small = np.stack([inputs[i] for i in rows])
      l_small = np.asarray(
          color.rgb_to_lab(np.repeat(small[..., None], 3, -1).astype(np.float32) / 255.0)
      )[..., :1]
      given = None
      if hint_channels is not None:
        given = np.concatenate([hint_channels[i] for i in rows])
      prediction = self._predict(
          self.variables, l_small / color.L_SCALE, emb[rows], given, temperature
      )
      for i, out in zip(rows, np.asarray(prediction)):
        ab[i] = out
    return ab


def recombine(l_full, ab_small):
  """Full-res L (H, W) + working-size ab/128 (h, w, 2) -> uint8 RGB (H, W, 3) at full size."""
  h, w = l_full.shape
  ab = np.stack(
      [
          np.asarray(
              Image.fromarray(ab_small[..., c].astype(np.float32), 'F').resize(
                  (w, h), Image.Resampling.BILINEAR
              )
          )
          for c in range(2)
      ],
      axis=-1,
  ) * np.float32(color.AB_SCALE)
  return _per_pixel(_lab_to_srgb_uint8, l_full.astype(np.float32)[..., None], ab)
