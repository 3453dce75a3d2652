"""Colorization metrics, per image, in JAX (jit-able, batched over the leading axis).

All take RGB in [0, 1] (B, H, W, 3) unless they say otherwise.
"""

import dm_pix
import jax.numpy as jnp
import numpy as np

MAX_PSNR = 100.0  # dB, reported for an exact match (MSE 0)
AUC_THRESHOLDS = np.arange(
    0.0, 151.0, dtype=np.float32
)  # ab distance thresholds 0..150 (Zhang et al. 2016)


def psnr(a, b):
  """Per-image PSNR in dB, capped at MAX_PSNR."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return jnp.minimum(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), MAX_PSNR)


def ssim(a, b):
  """Per-image SSIM (Gaussian window 11, sigma 1.5, channels averaged), via dm-pix."""
  return dm_pix.ssim(a.astype(jnp.float32), b.astype(jnp.float32), max_val=1.0)


def colorfulness(rgb):
  """Hasler & Süsstrunk's (2003) M3 colourfulness of each image, on 0-255 RGB, as the
  colorization literature's tables compute it (DDColor, ColorFormer, BigColor: the code they
  share): the statistics of |R - G| and |(R + G) / 2 - B|, the absolute values of the paper's
  opponent components, so that a figure can be set beside theirs."""
  x = rgb.astype(jnp.float32) * 255.0
  rg = jnp.abs(x[..., 0] - x[..., 1])
  yb = jnp.abs(0.5 * (x[..., 0] + x[..., 1]) - x[..., 2])
  axes = (1, 2)
  sigma = jnp.sqrt(jnp.var(rg, axis=axes) + jnp.var(yb, axis=axes))
  mu = jnp.sqrt(jnp.square(jnp.mean(rg, axis=axes)) + jnp.square(jnp.mean(yb, axis=axes)))
  return sigma + 0.3 * mu


def ab_error_auc(ab_pred, ab_true):
  """Per-image area under the curve 'fraction of pixels whose ab error (Euclidean, in Lab
  units) is within t', t = 0..150, normalised to [0, 1] (Zhang et al., 2016).

  ab_* are in Lab units (not the /128 training scale), shape (B, H, W, 2).
  """
  dist = jnp.sqrt(jnp.sum(jnp.square(ab_pred - ab_true), axis=-1))  # (B, H, W)
  within = jnp.mean(dist[:, None] <= AUC_THRESHOLDS[None, :, None, None], axis=(2, 3))  # (B, T)
  return jnp.trapezoid(within, AUC_THRESHOLDS, axis=1) / (AUC_THRESHOLDS[-1] - AUC_THRESHOLDS[0])
