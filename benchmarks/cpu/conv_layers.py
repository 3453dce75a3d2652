"""Each of the seed model's convolutions alone, forward + both gradients, XLA against PyTorch.

The plain layer as SPEC §1 lists it (colorflax's cheaper forms of enc1, dec1_0 and dec3_0 are
not used here), batch 8, NHWC in XLA (with colorflax's XLA flags) and channels-last in PyTorch,
median of 7 after a warm-up; BENCHMARKS.md quotes it:

  python benchmarks/cpu/conv_layers.py [IMAGE_SIZE]     # default 128
"""

import os
import sys

import colorflax  # noqa: F401  (its XLA flags, before JAX starts)
import jax
import jax.numpy as jnp
import torch

from colorflax import timing

LAYERS = [  # name, input channels, output channels, kernel, resolution divisor
    ('enc1', 1, 128, 3, 1),
    ('enc2_1', 128, 128, 5, 2),
    ('enc2_3', 128, 128, 3, 2),
    ('enc3_1', 128, 256, 5, 4),
    ('enc3_3', 256, 256, 3, 4),
    ('enc4_1', 256, 256, 5, 8),
    ('enc4_3', 256, 256, 3, 8),
    ('enc4_5', 256, 256, 3, 8),
    ('dec1_0', 1256, 128, 3, 8),
    ('dec1_2', 128, 64, 3, 8),
    ('dec2_0', 320, 128, 3, 4),
    ('dec3_0', 256, 64, 5, 2),
    ('dec3_2', 64, 64, 3, 2),
    ('dec3_4', 64, 32, 3, 2),
    ('dec3_6', 32, 2, 3, 2),
    ('dec4_0', 2, 2, 3, 1),
]


def median_seconds(fn, repeats=7):
  fn()  # compilation / warm-up
  return timing.median_time(fn, repeats)


def main(size=128, batch=8):
  torch.set_num_threads(os.cpu_count() or 1)  # as colorflax.benchmark's PyTorch step
  total = {'xla': 0.0, 'torch': 0.0}
  for name, cin, cout, k, divisor in LAYERS:
    h = size // divisor
    x = jax.random.normal(jax.random.key(0), (batch, h, h, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
    loss = lambda x, w: jnp.sum(
        jax.lax.conv_general_dilated(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )
        ** 2
    )
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    xla = median_seconds(lambda: jax.block_until_ready(grads(x, w)))

    xt = torch.randn(batch, cin, h, h).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).to(memory_format=torch.channels_last)

    def torch_step():
      xt.grad = None
      conv.zero_grad(set_to_none=True)
      (conv(xt) ** 2).sum().backward()

    pt = median_seconds(torch_step)
    flops = 3 * 2 * batch * h * h * cin * cout * k * k  # forward, input gradient, weight gradient
    total['xla'] += xla
    total['torch'] += pt
    print(
        f'{name:7s} {h:3d}² {cin:4d}->{cout:3d} k{k}: '
        f'XLA {xla * 1e3:7.1f} ms ({flops / xla / 1e9:4.0f} GFLOP/s)  '
        f'PyTorch {pt * 1e3:7.1f} ms ({flops / pt / 1e9:4.0f} GFLOP/s)  '
        f'XLA/PyTorch speed {pt / xla:.2f}',
        flush=True,
    )
  print(f"all layers: XLA {total['xla'] * 1e3:.0f} ms, PyTorch {total['torch'] * 1e3:.0f} ms")


if __name__ == '__main__':
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
