"""Faster forms of the standard layers the seed model is made of, for XLA (CPU above all).

Each computes what the plain layer computes (`nn.Conv` with torch's initialisation, max pool,
nearest upsampling, conv of a concatenation), with the same parameter names, so checkpoints and
the PyTorch prototype's weights fit either form; each is tested against the plain layer. Why
each one is faster is in its docstring; the measurements are in BENCHMARKS.md.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _torch_uniform(key, shape, dtype, fan_in):
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_conv_params(module, kernel_size, in_features, features):
  """`kernel` and `bias` as `nn.Conv` names them, initialised like `torch.nn.Conv2d`:
  U(±1/sqrt(fan_in))."""
  init = functools.partial(_torch_uniform, fan_in=in_features * kernel_size * kernel_size)
  return (
      module.param('kernel', init, (kernel_size, kernel_size, in_features, features), jnp.float32),
      module.param('bias', init, (features,), jnp.float32),
  )


def conv_same(x, kernel):
  """A stride-1 'same' convolution, NHWC x HWIO (square kernel)."""
  if min(x.shape[1:3]) < kernel.shape[0]:
    return _conv_same_small_grid(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _conv_same_small_grid(x, kernel):
  """`conv_same` for a grid smaller than the kernel, as one (B*H*W, taps*C) @ (taps*C, O) matmul.

  Why: XLA:CPU's convolution is pathologically slow there (8 x 4x4x256 input, 5x5 kernel to
  256: 179 ms forward, 2.6 ms as a matmul), which enc4's 5x5 conv meets at 32 px images. Taps
  that can only read padding (e.g. a 5x5 kernel on a 2x2 grid) are dropped: their products
  are zeros, so the values are the same and so are the kernel's gradients (zero there).
  """
  k, p = kernel.shape[0], kernel.shape[0] // 2
  _, h, w, _ = x.shape
  (y0, y1), (x0, x1) = [
      (max(0, p - n + 1), min(k, p + n)) for n in (h, w)
  ]  # the taps that reach the grid
  kernel = kernel[y0:y1, x0:x1]
  xp = jnp.pad(x, ((0, 0), (p - y0, y1 - 1 - p), (p - x0, x1 - 1 - p), (0, 0)))
  patches = jnp.concatenate(
      [xp[:, dy : dy + h, dx : dx + w] for dy in range(y1 - y0) for dx in range(x1 - x0)], axis=-1
  )
  return patches @ kernel.reshape(-1, kernel.shape[-1])


def _materialized(x, like):
  """x, unchanged, but computed and written to memory on its own.

  Why: XLA:CPU computes a convolution's weight gradient from a copy of its input transposed to
  (C, H, W, N), and fuses the ops that produced the input (bias, ReLU, BatchNorm) into that
  copy; a transpose with elementwise ops fused in runs several times slower than a plain one
  (8x64x64x128 float32: 10.6 vs 1.4 ms). A conditional is a fusion boundary XLA keeps
  (`optimization_barrier` is gone before fusion on CPU), so the transpose reads the stored x.
  Both branches return x; the predicate comes from `like`, a parameter, so that XLA cannot
  fold it and, the parameters being replicated, it needs no cross-device communication.
  A/B on the 128 px CPU step: 1.134 -> 1.089 s (BENCHMARKS.md).
  """
  return jax.lax.cond(jnp.isfinite(like.ravel()[0]), lambda y: y, lambda y: y + 0, x)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k), padding='SAME')` with torch's initialisation; the same
  parameter names and the same computation. `materialize_input`: see `_materialized`."""

  features: int
  kernel_size: int
  dtype: Any = jnp.float32
  materialize_input: bool = False

  @nn.compact
  def __call__(self, x):
    kernel, bias = _torch_conv_params(self, self.kernel_size, x.shape[-1], self.features)
    if self.materialize_input:
      x = _materialized(x, kernel)
    return conv_same(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def _phase_taps(kernel):
  """(2, kernel, 3) 0/1: tap k of a 'same' conv, at output phase a of a x2 nearest-upsampled
  input, reads low-resolution offset r - 1 (r = 0, 1, 2)."""
  p = kernel // 2
  taps = np.zeros((2, kernel, 3), np.float32)
  for a in range(2):
    for k in range(kernel):
      taps[a, k, (a + k - p) // 2 + 1] = 1.0
  return taps


class UpsampleConcatConv(nn.Module):
  """`conv(concat([upsample_x2(low), skip]))`, 5x5 'same', without the upsampled tensor.

  The kernel's `low` half runs on the low-resolution grid as a 3x3 conv with 4x the outputs,
  one per output phase (each phase's 5x5 taps summed onto the 3 low-res rows and columns
  they read), interleaved back to full resolution: 36 % of that half's multiply-adds (9 x 4
  phases against 25 x 4 pixels). The same parameters as `nn.Conv` (`kernel`, `bias`,
  torch's init); the same values to float rounding.
  """

  features: int
  dtype: Any = jnp.float32
  materialize_input: bool = False

  @nn.compact
  def __call__(self, low, skip):
    k = 5
    b, h, w, c_low = low.shape
    kernel, bias = _torch_conv_params(self, k, c_low + skip.shape[-1], self.features)
    if self.materialize_input:
      low, skip = _materialized(low, kernel), _materialized(skip, kernel)
    taps = _phase_taps(k)
    phases = jnp.einsum('akr,bls,klio->rsiabo', taps, taps, kernel[:, :, :c_low])
    phases = phases.reshape(3, 3, c_low, 4 * self.features)
    y = conv_same(low.astype(self.dtype), phases.astype(self.dtype))
    y = (
        y.reshape(b, h, w, 2, 2, self.features)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(b, 2 * h, 2 * w, self.features)
    )
    y = y + conv_same(skip.astype(self.dtype), kernel[:, :, c_low:].astype(self.dtype))
    return y + bias.astype(self.dtype)


def _taps_inside(n, kernel):
  """(n, kernel) 0/1: tap t of a 'same' conv, at position i, reads inside the image."""
  i, t = np.arange(n)[:, None], np.arange(kernel)[None, :]
  return ((i + t - kernel // 2 >= 0) & (i + t - kernel // 2 < n)).astype(np.float32)


class FusionConv(nn.Module):
  """`conv(concat([x, embedding tiled over x's grid]))`, 3x3 'same', without the tiled tensor.

  The embedding is the same at every position, so its part of the convolution is, per image,
  one vector per kernel tap (`embedding @ kernel[tap]`), summed at each position over the taps
  that fall inside the image. That replaces dec1_0's 1000-channel convolution and its two
  gradients (80 % of the layer's FLOPs) by (B, 1000) x (1000, 9 x features) matmuls. The same
  parameters as `nn.Conv` (`kernel`, `bias`, torch's init); the same values to float rounding.
  """

  features: int
  dtype: Any = jnp.float32
  materialize_input: bool = False

  @nn.compact
  def __call__(self, x, embedding):
    k = 3
    _, h, w, c = x.shape
    kernel, bias = _torch_conv_params(self, k, c + embedding.shape[-1], self.features)
    if self.materialize_input:
      x = _materialized(x, kernel)
    y = conv_same(x.astype(self.dtype), kernel[:, :, :c].astype(self.dtype))
    per_tap = jnp.einsum(
        'be,yxeo->byxo', embedding.astype(self.dtype), kernel[:, :, c:].astype(self.dtype)
    )
    y = y + jnp.einsum('iy,jx,byxo->bijo', _taps_inside(h, k), _taps_inside(w, k), per_tap)
    return y + bias.astype(self.dtype)


@jax.custom_vjp
def max_pool(x):
  """2x2 max pool, stride 2, as a reshape + max: the values of `nn.max_pool`, and the gradient
  of PyTorch's max_pool2d (all of it to the first maximum of each window, in row-major order).

  Why not `nn.max_pool`: XLA:CPU expands its gradient (select_and_scatter) into index arrays
  and a scatter, ~15 % of the CPU step. Why not autodiff of `jnp.max`: it finds the maxima by
  comparing the input with the output, and XLA may recompute the input inside that fusion
  with different rounding (seen after BatchNorm, whose output ties wherever the ReLU before
  it gave zeros), which sends gradient to the wrong elements. Here each window's first
  maximum is chosen by comparing its four elements with each other.
  """
  return _max_pool_fwd(x)[0]


def _windows(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x):
  return jnp.max(_windows(x), axis=(2, 4)), x


def _route_to_first_max(elems, g):
  """g sent to the first maximum of the 4 window elements `elems` (PyTorch's scan order),
  found by comparing them with each other: the 4 gradient parts."""
  best, first = elems[0], jnp.zeros(g.shape, jnp.int8)
  for k in (1, 2, 3):
    later_is_larger = elems[k] > best
    first = jnp.where(later_is_larger, jnp.int8(k), first)
    best = jnp.where(later_is_larger, elems[k], best)
  return [jnp.where(first == k, g, jnp.zeros_like(g)) for k in range(4)]


def _unpool(parts):
  """The 4 window parts (b, h, w, c), in scan order, interleaved to (b, 2h, 2w, c)."""
  b, h, w, c = parts[0].shape
  return (
      jnp.stack(parts, axis=3)
      .reshape(b, h, w, 2, 2, c)
      .transpose(0, 1, 3, 2, 4, 5)
      .reshape(b, 2 * h, 2 * w, c)
  )


def _max_pool_bwd(x, g):
  x6 = _windows(x)
  return (_unpool(_route_to_first_max([x6[:, :, i, :, j] for i in (0, 1) for j in (0, 1)], g)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _stem_planes(x):
  """x (B, H, W) zero-padded by 1, as 4x4 planes:
  planes[r][s][b, i, j] = xpad[b, 2i + r, 2j + s]."""
  _, h, w = x.shape
  xpad = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
  return [[xpad[:, r : r + h : 2, s : s + w : 2] for s in range(4)] for r in range(4)]


def _stem_phases(planes, kernel):
  """The 3x3 conv's output at the 4 positions of each 2x2 window, in scan order (B, H/2, W/2, C)."""
  return [
      sum(planes[a + dy][b + dx][..., None] * kernel[dy, dx] for dy in range(3) for dx in range(3))
      for a in (0, 1)
      for b in (0, 1)
  ]


@jax.custom_vjp
def _conv1_max_pool(x, kernel):
  """`max_pool(conv(x, kernel))` for a one-channel image x (B, H, W) and a 3x3 'same' kernel
  (3, 3, C), computed on the pooled grid: each window's 4 outputs are 9 multiply-adds from
  x's neighbourhood, maxed at once. The (B, H, W, C) conv output, the model's largest
  tensor, is never written, and the kernel gradient is one (9, 4 * B * H/2 * W/2) @ (.., C)
  matmul instead of a one-channel convolution's (XLA:CPU forward: 28 -> 2 ms at 128 px, batch 8).
  The gradient goes to each window's first maximum, as in `max_pool`.
  """
  return functools.reduce(jnp.maximum, _stem_phases(_stem_planes(x), kernel))


def _conv1_max_pool_fwd(x, kernel):
  return _conv1_max_pool(x, kernel), (x, kernel)


def _conv1_max_pool_bwd(res, g):
  x, kernel = res
  planes = _stem_planes(x)
  parts = _route_to_first_max(_stem_phases(planes, kernel), g)
  # d kernel[tap] = sum over windows and their 4 positions of x at that tap times the part.
  taps = jnp.stack(
      [
          jnp.stack([planes[a + dy][b + dx] for dy in range(3) for dx in range(3)], -1)
          for a in (0, 1)
          for b in (0, 1)
      ],
      axis=3,
  )  # (B, h, w, 4, 9)
  d_kernel = jnp.einsum('bijpt,bijpc->tc', taps, jnp.stack(parts, axis=3)).reshape(kernel.shape)
  # The input gradient (dead code in training, where L needs none) through the plain conv.
  _, conv_vjp = jax.vjp(lambda x: conv_same(x[..., None], kernel[:, :, None, :]), x)
  return conv_vjp(_unpool(parts))[0], d_kernel


_conv1_max_pool.defvjp(_conv1_max_pool_fwd, _conv1_max_pool_bwd)


class StemConvPool(nn.Module):
  """enc1's conv 1 -> features 3x3 'same' followed by the 2x2 max pool, as `_conv1_max_pool`.

  The bias is added after the pool: max(z + b) = max(z) + b exactly (rounding is monotone),
  on a quarter of the values. The same parameters as `nn.Conv` (`kernel`, `bias`, torch's
  init). Computed in float32 whatever the model's dtype (its FLOPs are negligible).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, extra=None):
    """`extra` (B, H, W, C), e.g. colour hints: more input channels, with a kernel of their own
    (`extra_kernel`) that starts at zero, so that the layer starts as the one-channel one."""
    kernel, bias = _torch_conv_params(self, 3, 1, self.features)
    if extra is None:
      y = _conv1_max_pool(x[..., 0].astype(jnp.float32), kernel[:, :, 0, :])
    else:  # the plain conv and pool: the one-channel shortcut does not apply
      shape = (3, 3, extra.shape[-1], self.features)
      extra_kernel = self.param('extra_kernel', nn.initializers.zeros, shape, jnp.float32)
      inputs = jnp.concatenate([x, extra], axis=-1).astype(jnp.float32)
      y = max_pool(conv_same(inputs, jnp.concatenate([kernel, extra_kernel], axis=2)))
    return (y + bias).astype(self.dtype)


def upsample(x):
  """Nearest-neighbour x2 as a broadcast + reshape (no gather)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)
