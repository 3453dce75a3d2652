"""The training objective and the per-image metrics of a batch, defined once, so that training,
validation (which drives the plateau scheduler and the best checkpoint) and `evaluate` measure
the same thing.

The objective is the seed's: the mean squared error of the normalised ab (ab/128).
"""

import jax.numpy as jnp

from colorflax import color, metrics


def batch_loss(pred, target):
  """The training loss of a batch: the mean over every element of (B, H, W, 2)."""
  return jnp.mean(jnp.square(pred - target))


def per_image_loss(pred, target):
  """The same loss for each image (B,): validation averages it over the split."""
  return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))


def image_metrics(pred, l_norm, ab_norm, rgb, full=False):
  """Per-image metrics (each (B,)) of the predicted ab/128 `pred`, for the images whose L/100,
  ab/128 and RGB in [0, 1] are given, over RGB rebuilt from each image's own L and the predicted
  ab, and for the grayscale baseline (a = b = 0, the `_gray` keys).

  Always 'loss', 'psnr', 'psnr_gray' (validation's); `full` adds what `evaluate` reports:
  'mse', 'ssim', the AuC of the ab error curve and colourfulness, each with its `_gray`, and
  'colorfulness_true' of the images themselves."""
  gray = jnp.zeros_like(pred)
  rebuilt = {'': color.lab_norm_to_rgb(l_norm, pred), '_gray': color.lab_norm_to_rgb(l_norm, gray)}
  out = {'loss': per_image_loss(pred, ab_norm)}
  for name, image in rebuilt.items():
    out['psnr' + name] = metrics.psnr(image, rgb)
  if not full:
    return out
  out['mse'] = out['loss']
  out['mse_gray'] = per_image_loss(gray, ab_norm)
  out['colorfulness_true'] = metrics.colorfulness(rgb)
  ab_true = ab_norm * color.AB_SCALE  # exact: AB_SCALE is a power of two
  for name, ab in (('', pred), ('_gray', gray)):
    out['ssim' + name] = metrics.ssim(rebuilt[name], rgb)
    out['auc' + name] = metrics.ab_error_auc(ab * color.AB_SCALE, ab_true)
    out['colorfulness' + name] = metrics.colorfulness(rebuilt[name])
  return out
