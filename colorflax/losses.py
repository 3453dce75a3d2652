"""The training objective and the per-image metrics of a batch, defined once, so that training,
validation (which drives the plateau scheduler and the best checkpoint) and `evaluate` measure
the same thing.

`config.loss` picks the objective (`Objective`):
- 'mse' (the seed's, the default), 'l1', 'huber': regression of the normalised ab (ab/128);
- 'classification' (Zhang, Isola and Efros, ECCV 2016): the model emits one logit per ab bin at
  half the image's resolution; the target is each pixel's true ab soft-encoded over its nearest
  bins, the loss their cross-entropy weighted to rebalance rare colours, and the colour the
  annealed mean of the predicted distribution at a temperature (`decode`).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from colorflax import color, metrics
from colorflax.errors import UserError

LOSSES = ('mse', 'l1', 'huber', 'classification')  # config.loss
GRID = 10.0  # the side of an ab bin, in Lab units
AB_RANGE = 110.0  # bin centres from -110 to 110 in a and b


@functools.lru_cache(maxsize=None)
def bin_centres() -> np.ndarray:
  """(Q, 2) the centres (a, b) of the ab bins in the sRGB gamut: those of the 10-unit grid over
  [-115, 115]^2 whose square holds a colour of the gamut at some lightness (6 x 6 points of each
  square at L* = 1, 3, ..., 99 tried). Q = 261 (Zhang et al. keep 313: the bins ImageNet's
  pixels fall in, with JPEG's colours out of the gamut)."""
  grid = np.arange(-AB_RANGE, AB_RANGE + 1, GRID, dtype=np.float32)
  a, b = np.meshgrid(grid, grid, indexing='ij')
  centres = np.stack([a.ravel(), b.ravel()], -1)
  offsets = np.linspace(-GRID / 2, GRID / 2, 6, dtype=np.float32)
  oa, ob = np.meshgrid(offsets, offsets, indexing='ij')
  points = centres[:, None] + np.stack([oa.ravel(), ob.ravel()], -1)[None]  # (529, 36, 2)
  lightness = np.arange(1, 100, 2, dtype=np.float32)
  shape = (len(centres), points.shape[1], len(lightness))
  lab = np.concatenate(
      [
          np.broadcast_to(lightness[None, None, :, None], shape + (1,)),
          np.broadcast_to(points[:, :, None, :], shape + (2,)),
      ],
      -1,
  )
  with jax.ensure_compile_time_eval():  # a constant, also when first asked for inside a jit
    rgb = np.asarray(color.lab_to_rgb(lab.reshape(-1, 3), clip=False)).reshape(shape + (3,))
  inside = ((rgb >= 0) & (rgb <= 1)).all(-1).any((1, 2))
  return centres[inside]


def soft_encode(ab, centres, neighbours=5, sigma=5.0):
  """ab (..., 2) in Lab units -> (the indices (..., k) of its k nearest bins, their weights
  (..., k): a Gaussian of the distance, sigma in Lab units, summing to 1)."""
  d2 = jnp.sum(jnp.square(ab[..., None, :] - centres), -1)  # (..., Q)
  neg, idx = jax.lax.top_k(-d2, neighbours)
  w = jnp.exp(neg / (2 * sigma**2))
  return idx, w / jnp.sum(w, -1, keepdims=True)


def class_weights(histogram, centres, sigma=5.0, mix=0.5):
  """The rebalancing weight of each bin (Q,): the training pixels' ab distribution `histogram`
  smoothed with a Gaussian (sigma, Lab units), mixed with the uniform one (`mix` = lambda),
  inverted, and scaled so that the expected weight of a training pixel is 1."""
  p = np.asarray(histogram, np.float64)
  p = p / max(p.sum(), 1e-12)
  c = np.asarray(centres, np.float64)
  kernel = np.exp(-np.sum(np.square(c[:, None] - c[None]), -1) / (2 * sigma**2))
  smooth = kernel @ p
  smooth = smooth / smooth.sum()
  w = 1.0 / ((1 - mix) * smooth + mix / len(p))
  return (w / np.sum(smooth * w)).astype(np.float32)


@jax.jit
def ab_histogram(images):
  """How many pixels of uint8 RGB `images` (B, H, W, 3) fall in each ab bin (Q,), counted at
  half resolution as the classification loss sees them (their nearest bin's centre)."""
  lab = color.rgb_to_lab(color.uint8_to_unit(images))
  ab = _half(lab[..., 1:] / color.AB_SCALE).reshape(-1, 2)
  centres = jnp.asarray(bin_centres())
  nearest = jnp.argmin(jnp.sum(jnp.square(ab[:, None] - centres), -1), -1)
  return jnp.zeros(len(centres), jnp.int32).at[nearest].add(1)


def annealed_mean(logits, centres, temperature):
  """The colour of each pixel (..., 2), Lab units: the mean of the bin centres under the
  predicted distribution sharpened by `temperature` (1: the mean; towards 0: the mode)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return jax.nn.softmax(logp / temperature, -1) @ centres


def _half(ab_norm):
  """ab/128 (B, H, W, 2) -> Lab units at half the resolution (2x2 means): the logits' grid."""
  b, h, w, _ = ab_norm.shape
  return ab_norm.reshape(b, h // 2, 2, w // 2, 2, 2).mean((2, 4)) * color.AB_SCALE


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the model's output is and how it is scored: `decode` turns it into ab/128, the losses
  score it against the true ab/128 (B, H, W, 2)."""

  name: str = 'mse'
  huber_delta: float = 0.05  # 'huber': in ab/128 units (about 6 Lab units)
  temperature: float = 0.38  # 'classification': the annealed mean's default
  neighbours: int = 5
  sigma: float = 5.0
  weights: Any = None  # 'classification': the rebalancing weight of each bin (Q,), or uniform

  @property
  def classes(self) -> int:
    """The model's outputs per pixel: 0 for ab itself, else one logit per bin."""
    return len(bin_centres()) if self.name == 'classification' else 0

  def decode(self, output):
    """The model's output -> ab/128 at the image's resolution (B, H, W, 2)."""
    if self.name != 'classification':
      return output
    ab = self.decode_half(output)
    b, h, w, _ = ab.shape
    return jax.image.resize(ab, (b, 2 * h, 2 * w, 2), 'linear')

  def decode_half(self, logits):
    """The classification head's logits -> ab/128 on their own (half-resolution) grid."""
    return annealed_mean(logits, jnp.asarray(bin_centres()), self.temperature) / color.AB_SCALE

  def _per_pixel(self, output, target):
    """The loss of each pixel (B, h, w) of the output's grid."""
    if self.name == 'classification':
      centres = jnp.asarray(bin_centres())
      idx, w = soft_encode(_half(target), centres, self.neighbours, self.sigma)
      logp = jax.nn.log_softmax(output.astype(jnp.float32), -1)
      cross_entropy = -jnp.sum(w * jnp.take_along_axis(logp, idx, -1), -1)
      if self.weights is None:
        return cross_entropy
      return jnp.asarray(self.weights)[idx[..., 0]] * cross_entropy  # the nearest bin's weight
    if self.name == 'l1':
      return jnp.mean(jnp.abs(output - target), -1)
    if self.name == 'huber':
      err = jnp.abs(output - target)
      quadratic = jnp.minimum(err, self.huber_delta)
      return jnp.mean(0.5 * quadratic**2 + self.huber_delta * (err - quadratic), -1)
    raise ValueError(self.name)

  def batch_loss(self, output, target):
    """The training loss of a batch: the mean over its pixels."""
    if self.name == 'mse':  # the seed's, to the last bit: the mean over every element
      return jnp.mean(jnp.square(output - target))
    return jnp.mean(self._per_pixel(output, target))

  def per_image_loss(self, output, target):
    """The same loss for each image (B,): validation averages it over the split."""
    if self.name == 'mse':
      return jnp.mean(jnp.square(output - target), axis=(1, 2, 3))
    return jnp.mean(self._per_pixel(output, target), axis=(1, 2))


def objective(config, weights=None, temperature=None):
  """The Objective `config` names (a config saved before `loss` existed: the seed's MSE).
  `temperature`: the annealed mean's, for this use only (evaluate/colorize --temperature; None:
  the config's); a loss without one refuses it."""
  c = config.get('classification', {}) or {}
  name = config.get('loss', 'mse')
  if temperature is not None and name != 'classification':
    raise UserError(
        f'--temperature: the run was trained with loss={name}, which has no temperature (the '
        'classification loss has)'
    )
  return Objective(
      name=name,
      huber_delta=config.get('huber_delta', 0.05),
      temperature=c.get('temperature', 0.38) if temperature is None else temperature,
      neighbours=c.get('neighbours', 5),
      sigma=c.get('sigma', 5.0),
      weights=weights,
  )


def image_metrics(pred, l_norm, ab_norm, rgb, full=False, loss=None):
  """Per-image metrics (each (B,)) of the predicted ab/128 `pred`, for the images whose L/100,
  ab/128 and RGB in [0, 1] are given, over RGB rebuilt from each image's own L and the predicted
  ab, and for the grayscale baseline (a = b = 0, the `_gray` keys). `loss`: each image's loss
  (B,), by default the MSE of `pred`.

  Always 'loss', 'psnr', 'psnr_gray' (validation's); `full` adds what `evaluate` reports:
  'mse', 'ssim', the AuC of the ab error curve and colourfulness, each with its `_gray`, and
  'colorfulness_true' of the images themselves."""
  gray = jnp.zeros_like(pred)
  rebuilt = {'': color.lab_norm_to_rgb(l_norm, pred), '_gray': color.lab_norm_to_rgb(l_norm, gray)}
  mse = Objective().per_image_loss
  out = {'loss': mse(pred, ab_norm) if loss is None else loss}
  for name, image in rebuilt.items():
    out['psnr' + name] = metrics.psnr(image, rgb)
  if not full:
    return out
  out['mse'] = mse(pred, ab_norm)
  out['mse_gray'] = mse(gray, ab_norm)
  out['colorfulness_true'] = metrics.colorfulness(rgb)
  ab_true = ab_norm * color.AB_SCALE  # exact: AB_SCALE is a power of two
  for name, ab in (('', pred), ('_gray', gray)):
    out['ssim' + name] = metrics.ssim(rebuilt[name], rgb)
    out['auc' + name] = metrics.ab_error_auc(ab * color.AB_SCALE, ab_true)
    out['colorfulness' + name] = metrics.colorfulness(rebuilt[name])
  return out
