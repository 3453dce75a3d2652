"""Colour hints: points of known colour a model with `model.hints` is trained to follow (Zhang
et al., "Real-Time User-Guided Image Colorization with Learned Deep Priors", SIGGRAPH 2017).

A model's hints are three channels beside its L input (`channels`): hint a and hint b (ab/128,
0 where there is none) and a mask (1 where a hint is). A hint is a square patch of one colour.

- Training simulates a user (`simulate`): per image a geometric number of points (P(n) =
  p (1 - p)^n: a share p of the images gets none, the mean is (1 - p) / p), at most
  `max_points`, each a patch of side 1 to `max_patch` px placed around the image's centre
  (normal, sigma a quarter of the side) and filled with the true patch's mean ab. It runs on
  the device inside the jitted step, from keys of (seed, step), so a resumed run samples what an
  uninterrupted one would have.
- `evaluate --hints N` reveals exactly N such patches per image, from keys of (seed, row).
- `colorize --hints FILE` reads a user's points (`read_points`): JSON
  {"points": [{"x": X, "y": Y, "rgb": "#rrggbb"}, ...]} in the image's own pixels; each becomes
  a USER_PATCH-px patch of the colour's ab (its lightness is not used) on the model's grid.

Where patches overlap, the hint is their mean colour. The model also gets the hints carried
over the image (`spread`) at its output layer.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from colorflax import color
from colorflax.errors import UserError

CHANNELS = 3  # hint a, hint b, mask
USER_PATCH = 3  # the side, on the model's grid, of a point given to `colorize --hints`
_STREAM = 0x4117  # folded into a step's key: the hints' randomness, apart from augmentation's


def channels(top, left, size, ab, valid, height, width):
  """The hint channels (B, H, W, 3) of B images' M patches each: `top`, `left`, `size` (B, M)
  int, `ab` (B, M, 2) the colours (ab/128), `valid` (B, M) which patches are there."""
  rows = jnp.arange(height)[None, None, :]
  cols = jnp.arange(width)[None, None, :]
  valid = jnp.asarray(valid, jnp.float32)
  in_rows = ((rows >= top[..., None]) & (rows < (top + size)[..., None])) * valid[..., None]
  in_cols = (cols >= left[..., None]) & (cols < (left + size)[..., None])
  in_cols = in_cols.astype(jnp.float32)
  # Separable: a patch covers (row, col) iff it covers the row and the column.
  count = jnp.einsum('bmh,bmw->bhw', in_rows, in_cols)
  total = jnp.einsum('bmh,bmw,bmc->bhwc', in_rows, in_cols, jnp.asarray(ab, jnp.float32))
  mask = (count > 0).astype(jnp.float32)
  return jnp.concatenate([total / jnp.maximum(count, 1.0)[..., None], mask[..., None]], axis=-1)


SPREAD = 8  # spread's Gaussian: its sigma is the image's shorter side over this


def spread(hint_channels):
  """The hints carried over the image (B, H, W, 3): (c a, c b, c) where (a, b) is the hints'
  colour averaged with a Gaussian of the distance (sigma the shorter side / SPREAD) and c in
  [0, 1) how much hint is near: 1 - exp(-the Gaussian-weighted number of hinted pixels). Zero
  without hints, and far from every hint.

  Why: a photo's colours are largely one cast over large regions, which a few hints reveal. On
  the development set, each held-out crop's mean true colour alone scores 29 dB, a model's
  output 21.7, and that output shifted by the mean colour of 10 hints 26.7: a model given this
  field at its output starts with that, where a path grown from zero learnt a third of it in a
  CPU run's steps (docs/inference.md)."""
  _, h, w, _ = hint_channels.shape
  sigma = min(h, w) / SPREAD
  gauss = lambda n: jnp.exp(
      -jnp.square(jnp.arange(n)[:, None] - jnp.arange(n)[None]) / (2 * sigma**2)
  )
  mask = hint_channels[..., 2:]
  weighted = jnp.concatenate([hint_channels[..., :2] * mask, mask], axis=-1)
  blurred = jnp.einsum('ij,bjkc,lk->bilc', gauss(h), weighted, gauss(w))
  near = blurred[..., 2:]
  colour = blurred[..., :2] / jnp.maximum(near, 1e-6)
  confidence = 1.0 - jnp.exp(-near)
  return jnp.concatenate([colour * confidence, confidence], axis=-1)


def half_resolution(hint_channels):
  """Hint channels (B, H, W, 3) at half resolution: each 2x2 window's mean hint colour over its
  hinted pixels, and whether it has any (for the classification head's half-resolution logits)."""
  b, h, w, _ = hint_channels.shape
  windows = hint_channels.reshape(b, h // 2, 2, w // 2, 2, CHANNELS)
  mask = windows[..., 2:]
  pixels = jnp.sum(mask, axis=(2, 4))
  ab = jnp.sum(windows[..., :2] * mask, axis=(2, 4)) / jnp.maximum(pixels, 1.0)
  return jnp.concatenate([ab, (pixels > 0).astype(jnp.float32)], axis=-1)


def none(l_norm):
  """The hint channels of images without hints: zeros like (B, H, W, 3)."""
  return jnp.zeros(l_norm.shape[:3] + (CHANNELS,), jnp.float32)


def _patch_means(ab, top, left, size):
  """The mean of `ab` (H, W, 2) over each square patch (M,), from its integral image."""
  integral = jnp.pad(jnp.cumsum(jnp.cumsum(ab, 0), 1), ((1, 0), (1, 0), (0, 0)))
  bottom, right = top + size, left + size
  total = (
      integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
  )
  return total / jnp.square(size).astype(jnp.float32)[:, None]


def _sample_one(key, ab, count, slots, max_patch):
  """One image's `slots` patches, the first `count` of them valid: (top, left, size, ab, valid)."""
  h, w = ab.shape[:2]
  k_size, k_y, k_x = jax.random.split(key, 3)
  size = jax.random.randint(k_size, (slots,), 1, min(max_patch, h, w) + 1)

  def around_centre(k, side):
    room = (side - size + 1).astype(jnp.float32)  # the positions a patch of this size can take
    at = room / 2 + jax.random.normal(k, (slots,)) * room / 4
    return jnp.clip(jnp.floor(at).astype(jnp.int32), 0, side - size)

  top, left = around_centre(k_y, h), around_centre(k_x, w)
  valid = jnp.arange(slots) < count
  return top, left, size, _patch_means(ab, top, left, size), valid


def sample(keys, ab_norm, counts, slots, max_patch=9):
  """The hint channels (B, H, W, 3) of `counts` (B,) patches per image revealed from the true
  `ab_norm` (B, H, W, 2), with one key per image; `slots` (static) >= every count."""
  if slots == 0:
    return none(ab_norm)
  parts = jax.vmap(lambda k, ab, n: _sample_one(k, ab, n, slots, max_patch))(keys, ab_norm, counts)
  return channels(*parts, ab_norm.shape[1], ab_norm.shape[2])


def simulate(key, ab_norm, p, max_points, max_patch):
  """Training's hints for a batch (B, H, W, 2): a geometric number of patches per image."""
  k_count, k_images = jax.random.split(jax.random.fold_in(key, _STREAM))
  b = ab_norm.shape[0]
  # jax.random.geometric counts the trials up to the first success (>= 1): minus one is the
  # number of failures, P(0) = p.
  counts = jnp.minimum(jax.random.geometric(k_count, p, (b,)) - 1, max_points)
  return sample(jax.random.split(k_images, b), ab_norm, counts, max_points, max_patch)


def revealed(seed, rows, ab_norm, count, max_patch=9):
  """`evaluate --hints count`: the hints of the images at cache `rows` (B,), a function of
  (seed, row) only, whatever the batch."""
  base = jax.random.fold_in(jax.random.key(seed), _STREAM)
  keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows))
  counts = jnp.full((ab_norm.shape[0],), count, jnp.int32)
  return sample(keys, ab_norm, counts, count, max_patch)


def require(model, workdir):
  """--hints (of colorize or evaluate) need a model trained with them: else one line."""
  if not model.hints:
    raise UserError(
        f'--hints: {workdir} was trained without colour hints (model.hints); use a model trained '
        'with --config.model.hints=true'
    )


def config_values(config):
  """(p, max_points, max_patch) of `config.hints`, the training simulation's parameters."""
  h = config.get('hints', {}) or {}
  return h.get('p', 0.125), h.get('max_points', 32), h.get('max_patch', 9)


_RGB = re.compile(r'^#[0-9a-fA-F]{6}$')


def read_points(path):
  """[(x, y, ab (2,) in Lab units)] of a hints JSON file; UserError (one line) if it is not
  one. Coordinates are checked against an image in `points_for`."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise UserError(f'hints {path}: {e.strerror or e}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'hints {path}: not JSON ({e})') from None
  return parse_points(data, f'hints {path}')


def parse_points(data, where='hints'):
  """`read_points` of the JSON's value `data` ({"points": [...]}); errors start with `where`."""
  if not isinstance(data, dict) or not isinstance(data.get('points'), list):
    raise UserError(f'{where}: expected {{"points": [{{"x": X, "y": Y, "rgb": "#rrggbb"}}]}}')
  points = []
  for i, p in enumerate(data['points']):
    at = f'{where}: point {i}'
    if not isinstance(p, dict) or set(p) - {'x', 'y', 'rgb'} or not {'x', 'y', 'rgb'} <= set(p):
      raise UserError(f'{at}: expected {{"x": X, "y": Y, "rgb": "#rrggbb"}}, got {p!r}')
    x, y, rgb = p['x'], p['y'], p['rgb']
    for name, v in (('x', x), ('y', y)):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise UserError(f'{at}: {name} must be a number of pixels, got {v!r}')
    if not isinstance(rgb, str) or not _RGB.match(rgb):
      raise UserError(f'{at}: rgb must be a colour as #rrggbb, got {rgb!r}')
    unit = np.array([int(rgb[k : k + 2], 16) for k in (1, 3, 5)], np.float32) / 255.0
    ab = np.asarray(color.rgb_to_lab(unit[None]))[0, 1:]
    points.append((float(x), float(y), ab))
  return points


def points_for(points, path, image_size, grid_size):
  """The hint channels (1, h, w, 3) of user `points` on an image of `image_size` (W, H) whose
  model grid is `grid_size` (w, h); a point outside the image is a UserError naming `path`."""
  (width, height), (w, h) = image_size, grid_size
  top, left, ab = [], [], []
  for i, (x, y, ab_lab) in enumerate(points):
    if not (0 <= x < width and 0 <= y < height):
      raise UserError(
          f'hints for {path}: point {i} at ({x:g}, {y:g}) is outside the {width}x{height} image'
      )
    gx, gy = int(x * w / width), int(y * h / height)  # the grid cell the point falls in
    top.append(min(max(gy - USER_PATCH // 2, 0), h - USER_PATCH))
    left.append(min(max(gx - USER_PATCH // 2, 0), w - USER_PATCH))
    ab.append(ab_lab / color.AB_SCALE)
  m = len(points)
  if m == 0:
    return np.zeros((1, h, w, CHANNELS), np.float32)
  as_batch = lambda v, dtype: np.asarray(v, dtype).reshape((1, m) + np.shape(v)[1:])
  return np.asarray(
      channels(
          as_batch(top, np.int32),
          as_batch(left, np.int32),
          np.full((1, m), USER_PATCH, np.int32),
          as_batch(ab, np.float32),
          np.ones((1, m), bool),
          h,
          w,
      )
  )
