"""A 'same' convolution whose weight gradient is summed over small tiles, for XLA:CPU.

XLA:CPU computes a convolution's weight gradient as one convolution whose contraction runs
over the whole batch and image; at the seed's shapes that runs at 35–100 GFLOP/s against
300+ for the forward pass, and was 65 % of the CPU training step (BENCHMARKS.md). The same
gradient summed over one image and one `tile`×`tile` window at a time (each window read
with its k//2 halo, so the sum is exact) keeps every piece in cache and runs 2–4× faster.
Forward and input gradient are XLA's own. On GPU and TPU the native gradient is fast:
there the model uses `lax.conv_general_dilated` directly.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')
MIN_CHANNELS = 64  # the model tiles only layers with at least this many input and output channels


def _conv(x, w, padding):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)


def weight_grad(x, dy, kernel_size: int, tile: int):
  """d(sum(dy * conv_same(x, w)))/dw, as a sum over (image, tile) pieces, in float32.

  Each piece reads its window of `x` with the halo and pads only at the image's border, so
  no padded copy of the whole activation is ever made.
  """
  n, h, wd, _ = x.shape
  p = kernel_size // 2
  w0 = jnp.zeros((kernel_size, kernel_size, x.shape[-1], dy.shape[-1]), x.dtype)

  def window(start, size, extent):  # rows [start - p, start + size + p) clipped; the rest padded
    lo, hi = max(start - p, 0), min(start + size + p, extent)
    return lo, hi, (lo - (start - p), (start + size + p) - hi)

  parts = []
  for b in range(n):
    for i in range(0, h, tile):
      th = min(tile, h - i)
      r0, r1, row_pad = window(i, th, h)
      for j in range(0, wd, tile):
        tw = min(tile, wd - j)
        c0, c1, col_pad = window(j, tw, wd)
        xs = x[b:b + 1, r0:r1, c0:c1]
        _, vjp = jax.vjp(lambda w: _conv(xs, w, (row_pad, col_pad)), w0)
        parts.append(vjp(dy[b:b + 1, i:i + th, j:j + tw])[0].astype(jnp.float32))
  return functools.reduce(jnp.add, parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x, w, tile: int):
  """`lax.conv_general_dilated(x, w, (1, 1), 'SAME')` in NHWC/HWIO, odd square kernel."""
  return _conv(x, w, 'SAME')


def _fwd(x, w, tile):
  return _conv(x, w, 'SAME'), (x, w)


def _bwd(tile, res, dy):
  x, w = res
  dx = jax.vjp(lambda x: _conv(x, w, 'SAME'), x)[1](dy)[0]
  return dx, weight_grad(x, dy, w.shape[0], tile).astype(w.dtype)


conv_same.defvjp(_fwd, _bwd)


def flax_conv_fn(tile: int):
  """A `conv_general_dilated` for `flax.linen.Conv` (stride 1, 'SAME', no dilation or groups)."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, precision=None):
    ones = (1,) * (lhs.ndim - 2)
    supported = (lhs.ndim == 4 and tuple(window_strides) == ones
                 and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
                 and feature_group_count == 1 and rhs.shape[0] == rhs.shape[1]
                 and rhs.shape[0] % 2 == 1 and _is_same(padding, rhs.shape[0]))
    if not supported:
      raise ValueError('tiled_conv supports stride-1 SAME convolutions with odd square kernels '
                       f'only; got kernel {rhs.shape}, strides {window_strides}, padding {padding}')
    return conv_same(lhs, rhs, tile)

  return conv_general_dilated


def _is_same(padding, k):
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return all(tuple(p) == (k // 2, k // 2) for p in padding)
