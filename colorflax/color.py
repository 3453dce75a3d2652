"""sRGB (D65) <-> CIE L*a*b* in JAX, matching `skimage.color.rgb2lab` / `lab2rgb`.

Everything here is elementwise over a trailing channel axis, so it is jit-able, batched over
any leading axes, and cheap enough to run inside the training step on the device.
"""

import jax.numpy as jnp
import numpy as np

# skimage.color.colorconv.xyz_from_rgb (sRGB primaries, D65) and the D65 2° white point.
_XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=np.float64,
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float64)

# Luminance weights of skimage.color.rgb2gray (ITU-R BT.709), applied to gamma-encoded sRGB.
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)

# The seed's normalisation: the network sees L/100 in [0, 1] and predicts ab/128.
L_SCALE = 100.0
AB_SCALE = 128.0


def _mix(x, matrix):
  """x[..., 3] @ matrix.T, written as three FMAs so XLA fuses it with its neighbours."""
  m = matrix.astype(np.float32)
  return jnp.stack(
      [x[..., 0] * m[i, 0] + x[..., 1] * m[i, 1] + x[..., 2] * m[i, 2] for i in range(3)], axis=-1
  )


def rgb_to_lab(rgb):
  """sRGB in [0, 1], shape (..., 3) -> L*a*b* with L in [0, 100]."""
  rgb = jnp.asarray(rgb, jnp.float32)
  linear = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = _mix(linear, _XYZ_FROM_RGB / _WHITE_D65[:, None])
  # Clamp before the cube root: the gradient of cbrt at 0 is infinite, and the linear branch
  # is used there anyway.
  f = jnp.where(xyz > 0.008856, jnp.cbrt(jnp.maximum(xyz, 0.008856)), 7.787 * xyz + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _lab_to_linear_rgb(lab):
  """L*a*b* (..., 3) -> linear (not gamma-encoded) sRGB, unclipped."""
  lab = jnp.asarray(lab, jnp.float32)
  l, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
  fy = (l + 16.0) / 116.0
  fx = a / 500.0 + fy
  fz = jnp.maximum(fy - b / 200.0, 0.0)  # skimage clips negative z to 0 as well
  f = jnp.stack([fx, fy, fz], axis=-1)
  xyz = jnp.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE_D65.astype(np.float32)
  return _mix(xyz, _RGB_FROM_XYZ)


def lab_to_rgb(lab, clip=True):
  """L*a*b* (..., 3) -> sRGB in [0, 1] (out-of-gamut colours are clipped, as skimage does)."""
  linear = _lab_to_linear_rgb(lab)
  rgb = jnp.where(
      linear > 0.0031308,
      1.055 * jnp.maximum(linear, 0.0031308) ** (1.0 / 2.4) - 0.055,
      12.92 * linear,
  )
  return jnp.clip(rgb, 0.0, 1.0) if clip else rgb


# sRGB's [-1e-4, 1 + 1e-4] (the gamut, with float slack) in linear RGB: the gamma encoding is
# continuous and increasing, so testing linear values against these is the same test, without
# its power function in each of the bisection's steps.
_LINEAR_GAMUT = (-1e-4 / 12.92, ((1.0 + 1e-4 + 0.055) / 1.055) ** 2.4)


def fit_ab_to_gamut(l, ab, iterations=12):
  """Scales each pixel's (a, b) towards 0 just enough that (L, a, b) is inside the sRGB gamut.

  Clipping RGB (what `lab_to_rgb` does) changes a saturated pixel's lightness; reducing its
  chroma instead keeps L and hue exactly. l: (..., 1) in [0, 100], ab: (..., 2). Bisection.
  """

  def inside(scale):
    linear = _lab_to_linear_rgb(jnp.concatenate([l, ab * scale], axis=-1))
    return jnp.all(
        (linear >= _LINEAR_GAMUT[0]) & (linear <= _LINEAR_GAMUT[1]), axis=-1, keepdims=True
    )

  ok = inside(1.0)
  lo, hi = jnp.zeros_like(l), jnp.ones_like(l)
  for _ in range(iterations):
    mid = (lo + hi) / 2
    good = inside(mid)
    lo, hi = jnp.where(good, mid, lo), jnp.where(good, hi, mid)
  return ab * jnp.where(ok, 1.0, lo)


def rgb_to_gray(rgb):
  """Luminance grayscale (skimage.color.rgb2gray) of sRGB in [0, 1], shape (...,)."""
  rgb = jnp.asarray(rgb, jnp.float32)
  w = GRAY_WEIGHTS
  return rgb[..., 0] * w[0] + rgb[..., 1] * w[1] + rgb[..., 2] * w[2]


def uint8_to_unit(images):
  """uint8 images -> float32 in [0, 1]."""
  return jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)


def normalize_lab(lab):
  """L*a*b* (..., 3) -> (L/100 of shape (..., 1), ab/128 of shape (..., 2)): the seed's scaling."""
  return lab[..., :1] / L_SCALE, lab[..., 1:] / AB_SCALE


def denormalize_lab(l_norm, ab_norm):
  """Inverse of `normalize_lab`: (L/100, ab/128) -> L*a*b* (..., 3)."""
  return jnp.concatenate([l_norm * L_SCALE, ab_norm * AB_SCALE], axis=-1)


def lab_norm_to_rgb(l_norm, ab_norm):
  """The model's input and output, recombined into sRGB in [0, 1]."""
  return lab_to_rgb(
      denormalize_lab(jnp.asarray(l_norm, jnp.float32), jnp.asarray(ab_norm, jnp.float32))
  )
