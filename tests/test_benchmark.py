import pytest

from colorflax import benchmark
from configs import default


def _forward_flops(size):
  """2 x the multiply-accumulates of SPEC §1's table at `size` px (28.6 G at 256 px)."""
  layers = [  # (input channels, output channels, kernel, resolution divisor)
      (1, 128, 3, 1), (128, 128, 5, 2), (128, 128, 3, 2), (128, 256, 5, 4), (256, 256, 3, 4),
      (256, 256, 5, 8), (256, 256, 3, 8), (256, 256, 3, 8), (1256, 128, 3, 8), (128, 64, 3, 8),
      (320, 128, 3, 4), (256, 64, 5, 2), (64, 64, 3, 2), (64, 32, 3, 2), (32, 2, 3, 2), (2, 2, 3, 1)]
  return 2 * sum(i * o * k * k * (size // d) ** 2 for i, o, k, d in layers)


def test_benchmark_measures_both_frameworks_and_counts_flops():
  assert _forward_flops(256) == pytest.approx(2 * 28.6e9, rel=0.01)  # SPEC §3
  config = default.get_config()
  config.data.image_size = 32
  config.batch_size = 4
  config.steps_per_dispatch = 2
  r = benchmark.run(config, repeats=1, with_torch=True)
  for key in ('device', 'image_size', 'batch_size', 'dtype', 'jax_step_images_per_sec', 'torch_step_images_per_sec',
              'step_ratio', 'flops_per_image', 'achieved_flops', 'peak_flops', 'mfu'):
    assert key in r
  # A training step is forward + backward: about 3x the forward FLOPs (less: the first layer's
  # input gradient is not needed).
  assert 2.0 < r['flops_per_image'] / _forward_flops(32) < 3.2
  assert r['step_ratio'] == pytest.approx(r['jax_step_images_per_sec'] / r['torch_step_images_per_sec'])
  assert 0 < r['mfu'] < 1
  assert 'batch 4' in benchmark.format_table(r)
