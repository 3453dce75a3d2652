"""Can XLA:CPU reach this CPU's AMX bf16 units through the oneDNN inside jaxlib? (BENCHMARKS.md)

Times a 2048² matmul, and one convolution layer's forward + both gradients written two ways:
XLA's convolution (Eigen) and im2col + one dot (the only form XLA hands to oneDNN). Run it
once per XLA setting, each in a fresh process (XLA reads its flags once):

  python benchmarks/cpu/onednn_amx_probe.py                        # colorflax's flags: Eigen
  ONEDNN_DEFAULT_FPMATH_MODE=BF16 XLA_FLAGS="--xla_cpu_use_onednn=true \
    --xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT \
    --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE" \
    python benchmarks/cpu/onednn_amx_probe.py                      # dots on oneDNN, AMX allowed
  XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,\
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" python benchmarks/cpu/onednn_amx_probe.py   # YNNPACK's
"""

import os
import statistics
import time

import colorflax  # noqa: F401  (its XLA flags, before JAX starts)
import jax
import jax.numpy as jnp


def seconds(f, *args, repeats=5):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def im2col_conv(x, w):
  b, h, wd, c = x.shape
  k, o = w.shape[0], w.shape[-1]
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  cols = jnp.concatenate(
      [xp[:, i : i + h, j : j + wd] for i in range(k) for j in range(k)], axis=-1
  )
  return (cols.reshape(b * h * wd, k * k * c) @ w.reshape(k * k * c, o)).reshape(b, h, wd, o)


def fwd_bwd(f):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))


def main():
  print(
      'XLA_FLAGS:',
      os.environ.get('XLA_FLAGS', ''),
      '| ONEDNN_DEFAULT_FPMATH_MODE:',
      os.environ.get('ONEDNN_DEFAULT_FPMATH_MODE', ''),
  )
  key = jax.random.key(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(key, (2048, 2048), dtype)
    t = seconds(jax.jit(lambda a: a @ a), a)
    print(f'{jnp.dtype(dtype).name:8s} matmul 2048²: {2 * 2048 ** 3 / t / 1e9:5.0f} GFLOP/s')
  for b, s, c, o, k in ((8, 32, 256, 256, 3), (8, 64, 128, 128, 3), (8, 64, 128, 128, 5)):
    flops = 3 * 2 * b * s * s * c * o * k * k
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jax.random.normal(key, (b, s, s, c), dtype)
      w = jax.random.normal(key, (k, k, c, o), dtype) * 0.05
      times = {
          name: seconds(fwd_bwd(f), x, w) for name, f in (('conv', conv), ('im2col', im2col_conv))
      }
      print(
          f'{jnp.dtype(dtype).name:8s} {b}x{s}x{s}x{c} -> {o}, k{k}, fwd+bwd: '
          + ', '.join(
              f'{n} {t * 1e3:6.1f} ms ({flops / t / 1e9:3.0f} GFLOP/s)' for n, t in times.items()
          )
      )


if __name__ == '__main__':
  main()
