import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from colorflax import benchmark, benchmark_report, measurements
from colorflax.errors import UserError
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forward_flops(size):
  """2 x the multiply-accumulates of SPEC §1's table at `size` px (28.6 G at 256 px)."""
  layers = [  # (input channels, output channels, kernel, resolution divisor)
      (1, 128, 3, 1),
      (128, 128, 5, 2),
      (128, 128, 3, 2),
      (128, 256, 5, 4),
      (256, 256, 3, 4),
      (256, 256, 5, 8),
      (256, 256, 3, 8),
      (256, 256, 3, 8),
      (1256, 128, 3, 8),
      (128, 64, 3, 8),
      (320, 128, 3, 4),
      (256, 64, 5, 2),
      (64, 64, 3, 2),
      (64, 32, 3, 2),
      (32, 2, 3, 2),
      (2, 2, 3, 1),
  ]
  return 2 * sum(i * o * k * k * (size // d) ** 2 for i, o, k, d in layers)


def test_benchmark_measures_both_frameworks_and_counts_flops():
  assert _forward_flops(256) == pytest.approx(2 * 28.6e9, rel=0.01)  # SPEC §3
  config = default.get_config()
  config.data.image_size = 32
  config.batch_size = 4
  config.steps_per_dispatch = 2
  r = benchmark.run(config, repeats=1, with_torch=True, stream_images=160, epoch_images=48)
  for key in (
      'device',
      'image_size',
      'batch_size',
      'dtype',
      'jax_step_images_per_sec',
      'torch_step_images_per_sec',
      'step_ratio',
      'flops_per_image',
      'achieved_flops',
      'peak_flops',
      'mfu',
  ):
    assert key in r
  assert r['device'] == '1x cpu'  # of the 4 this process has: one, as PyTorch's side
  # A training step is forward + backward: about 3x the forward FLOPs (less: the first layer's
  # input gradient is not needed).
  assert 2.0 < r['flops_per_image'] / _forward_flops(32) < 3.2
  assert r['step_ratio'] == pytest.approx(
      r['jax_step_images_per_sec'] / r['torch_step_images_per_sec']
  )
  # The device's peak is the faster library's matmul; MFU is measured against it.
  assert r['jax_matmul_peak_flops'] > 0 and r['torch_matmul_peak_flops'] > 0
  assert r['peak_flops'] == max(r['jax_matmul_peak_flops'], r['torch_matmul_peak_flops'])
  assert r['mfu'] == pytest.approx(r['achieved_flops'] / r['peak_flops']) and 0 < r['mfu'] < 1
  # The streaming pipeline delivered every step of the measured epoch (120 train images / batch 4).
  assert r['stream_images_timed'] == (120 // 4 - 2) * 4 and r['stream_images_per_sec'] > 0
  assert r['stream_margin'] == pytest.approx(
      r['stream_images_per_sec'] / r['jax_step_images_per_sec']
  )
  # Both epochs ran over the same 36 training images (the seed-style one times all but its
  # warm-up batch), each measurement in its own process with its own peak memory.
  assert r['epoch_train_images'] == 36 and r['seed_pipeline_epoch_images'] == (36 // 4 - 1) * 4
  assert r['epoch_ratio'] == pytest.approx(
      r['jax_epoch_images_per_sec'] / r['seed_pipeline_epoch_images_per_sec']
  )
  for prefix in ('jax_step', 'torch_step', 'jax_epoch', 'seed_pipeline'):
    assert r[f'{prefix}_peak_rss_bytes'] > 50e6, prefix  # a process with its framework loaded
  table = benchmark_report.format_table(r)
  assert (
      'batch 4' in table
      and 'PyTorch' in table.split('matmul peak')[1]
      and 'streaming input' in table
      and 'seed-style epoch' in table
      and 'peak RSS' in table
  )


@pytest.mark.parametrize('dtype, torch_dtype', [('float32', 'float32'), ('bfloat16', 'bfloat16')])
def test_seed_pipeline_runs_in_the_configs_dtype_and_stops_at_its_cap(tmp_path, dtype, torch_dtype):
  config = default.get_config()
  config.data.image_size = 32
  config.batch_size = 4
  config.model.dtype = dtype
  cache_dir = measurements.random_cache(str(tmp_path / 'cache'), config, 40)
  # 40 training rows: a warm-up batch, then timing stops after 3 of the 9 remaining batches.
  from colorflax.reference import benchmark as reference

  r = reference.seed_pipeline_epoch(config, cache_dir, list(range(40)), max_images=10)
  assert (
      r['seed_pipeline_compute_dtype'] == torch_dtype
  )  # AMP bf16 exactly when colorflax runs bf16
  assert r['seed_pipeline_epoch_images'] == 12 and r['seed_pipeline_epoch_images_per_sec'] > 0


def test_too_few_epoch_images_for_the_seed_style_epoch_is_refused_up_front():
  # With one batch, the seed-style epoch would spend it on its warm-up and time nothing.
  config = default.get_config()
  config.batch_size = 128
  with pytest.raises(
      UserError,
      match=r'--epoch_images=192 leaves 144 training images, fewer than 2 batches of 128.*'
      r'--epoch_images=341 or more',
  ):
    benchmark.run(
        config, epoch_images=192, measure=lambda *args: pytest.fail('measured before the check')
    )
  benchmark.check_epoch_images(config, 341)  # 256 training images: two batches
  with pytest.raises(UserError, match='--epoch_images=340 leaves 255'):
    benchmark.check_epoch_images(config, 340)


def test_run_starts_no_jax_in_its_own_process_before_the_epoch_runs():
  """On a GPU, JAX started in the parent would hold the memory the epoch's child processes need:
  every JAX measurement before them runs in a child (here faked, to see only the parent)."""
  code = """
from jax._src import xla_bridge
from colorflax import benchmark
from configs import default
fake = {
    'jax_step': {'jax_step_images_per_sec': 1.0, 'flops_per_image': 1.0, 'platform': 'gpu',
                 'devices': 1},
    'torch_step': {'torch_step_images_per_sec': 1.0},
    'jax_matmul_peak': {'jax_matmul_peak_flops': 3.0},
    'torch_matmul_peak': {'torch_matmul_peak_flops': 2.0},
}
seen = []
benchmark.epochs = lambda *args: seen.append(xla_bridge.backends_are_initialized()) or {}
measure = lambda fn, *args: fake[fn.__name__]
r = benchmark.run(default.get_config(), epoch_images=24, measure=measure)
print(seen, r['peak_flops'])
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['[False]', '3.0']


def test_one_device_unless_asked_and_flops_counted_over_all_devices():
  config = default.get_config()  # num_devices = 0: all devices when training, one in the benchmark
  config.data.image_size, config.batch_size, config.steps_per_dispatch = 32, 4, 1
  with config.unlocked():
    config.num_devices = 1
  one = measurements.jax_step(config, repeats=1)
  config.num_devices = 2
  two = measurements.jax_step(config, repeats=1)
  assert (one['devices'], one['device'], two['devices'], two['device']) == (
      1,
      '1x cpu',
      2,
      '2x cpu',
  )
  # The same global batch of 4 images costs the same, whichever number of devices computes it.
  assert two['flops_per_image'] == pytest.approx(one['flops_per_image'], rel=1e-3)
  config.num_devices = 5
  with pytest.raises(UserError, match='config.num_devices: 5 requested, 4 available'):
    measurements.jax_step(config, repeats=1)


def test_flops_of_a_compiled_program_count_every_devices_share():
  # Where the backend has no count of the unoptimised program (GPUs), the compiled one's is
  # used, and XLA counts that for one device's partition of the batch.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh(
      (2,), ('data',), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,)
  )
  x = jax.device_put(np.ones((64, 256), np.float32), NamedSharding(mesh, P('data')))
  w = jax.device_put(np.ones((256, 512), np.float32), NamedSharding(mesh, P()))
  lowered = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w))).lower(x, w)
  matmul = 2 * 64 * 256 * 512
  assert measurements.program_flops(lowered, 2) == pytest.approx(matmul, rel=0.01)

  class AsOnAGpu:  # Lowered.cost_analysis is None on PJRT plugin backends
    cost_analysis = staticmethod(lambda: None)
    compile = staticmethod(lowered.compile)

  assert measurements.program_flops(AsOnAGpu(), 2) == pytest.approx(matmul, rel=0.01)


def test_mfu_on_several_accelerators_is_against_all_of_their_peaks():
  fake = {
      'jax_step': {
          'jax_step_images_per_sec': 100.0,
          'jax_step_seconds': 0.08,
          'flops_per_image': 1e12,
          'platform': 'gpu',
          'devices': 4,
          'device': '4x H200',
          'batch_size': 8,
          'jax_step_peak_device_bytes': 2e9,
      },
      'torch_step': {'torch_step_images_per_sec': 40.0, 'torch_step_peak_device_bytes': 5e9},
      'jax_matmul_peak': {'jax_matmul_peak_flops': 5e14},
      'torch_matmul_peak': {'torch_matmul_peak_flops': 4e14},
  }
  r = benchmark.run(
      default.get_config(), repeats=1, measure=lambda fn, *args: dict(fake[fn.__name__])
  )
  assert r['device_peak_flops'] == 5e14 and r['peak_flops'] == 4 * 5e14  # one H200's peak, times 4
  assert r['mfu'] == pytest.approx(100 * 1e12 / (4 * 5e14))
  table = benchmark_report.format_table(r)
  assert 'matmul peak 4 x 500.00 TFLOP/s' in table and 'img/s on 1 device' in table
  # Memory: colorflax's is each device's (the first one's); PyTorch's, its one device's.
  line = {l.split()[0]: l for l in table.splitlines()}
  assert line['colorflax'].endswith('peak 2.00 GB per device') and line['PyTorch'].endswith(
      'peak 5.00 GB device'
  )

  # The devices of one CPU share its cores: their peak is the one measured.
  assert (
      benchmark_report.peak_devices('cpu', 4) == 1 and benchmark_report.peak_devices('tpu', 4) == 4
  )
  assert 'on 1 device' not in benchmark_report.format_table({**r, 'platform': 'cpu'})


def test_a_whole_run_trains_every_epoch_and_is_timed_end_to_end(tmp_path):
  config = default.get_config()
  config.data.image_size, config.batch_size, config.num_devices = 32, 4, 1
  cache_dir = measurements.random_cache(
      str(tmp_path / 'cache'), config, 24
  )  # 18 training images: 4 steps an epoch
  r = measurements.jax_recipe(config, cache_dir, 2)
  assert (r['recipe_epochs'], r['recipe_steps']) == (2, 8) and r['recipe_seconds'] > 0


def test_the_whole_run_comes_last_and_its_failure_keeps_the_other_figures():
  calls = []

  def fake_measure(fn, *args):
    name = fn.__name__
    calls.append((name, args[-1] if name == 'jax_recipe' else None))
    if name == 'jax_recipe':
      raise MemoryError('out of device memory')
    return {
        'jax_step': {
            'jax_step_images_per_sec': 2.0,
            'jax_step_seconds': 4.0,
            'flops_per_image': 1e9,
            'platform': 'cpu',
            'devices': 1,
            'device': '1x cpu',
            'batch_size': 8,
        },
        'jax_matmul_peak': {'jax_matmul_peak_flops': 1e11},
        'jax_epoch': {'jax_epoch_images_per_sec': 1.5},
    }[name]

  config = default.get_config()
  with pytest.raises(UserError, match='--recipe_epochs=60 trains on the --epoch_images images'):
    benchmark.run(config, with_torch=False, recipe_epochs=60, measure=fake_measure)
  assert calls == []  # refused before measuring anything
  r = benchmark.run(
      config, with_torch=False, epoch_images=40, recipe_epochs=60, measure=fake_measure
  )
  assert [c[0] for c in calls] == [
      'jax_step',
      'jax_matmul_peak',
      'jax_epoch',
      'jax_recipe',
  ] and calls[-1][1] == 60
  assert (
      r['jax_epoch_images_per_sec'] == 1.5
      and r['recipe_error'] == 'MemoryError: out of device memory'
  )
  assert 'whole run failed: MemoryError' in benchmark_report.format_table(r)
  r.pop('recipe_error')
  r.update(recipe_seconds=150.0, recipe_epochs=60)
  assert (
      'whole run             150.0 s for 60 epochs of 30 images (2.5 min'
      in benchmark_report.format_table(r)
  )


def test_step_rounds_alternate_and_report_each_sides_median_round():
  calls, jax_ips, torch_ips = [], iter([6.0, 5.0, 7.0]), iter([5.5, 6.0, 6.5])

  def fake_measure(fn, *args):
    name = fn.__name__
    calls.append(name)
    if name == 'jax_step':
      v = next(jax_ips)
      return {'jax_step_images_per_sec': v, 'jax_step_peak_rss_bytes': int(v)}
    v = next(torch_ips)
    return {'torch_step_images_per_sec': v, 'torch_step_peak_rss_bytes': int(10 * v)}

  r = benchmark.step_rounds(default.get_config(), 1, True, 3, measure=fake_measure)
  assert calls == ['jax_step', 'torch_step'] * 3  # alternating, so a drift reaches both sides
  assert (
      r['jax_step_images_per_sec'] == 6.0 and r['jax_step_peak_rss_bytes'] == 6
  )  # the median run, whole
  assert r['torch_step_images_per_sec'] == 6.0 and r['torch_step_peak_rss_bytes'] == 60
  assert r['step_ratio'] == 1.0 and r['step_ratio_rounds'] == pytest.approx(
      [6 / 5.5, 5 / 6, 7 / 6.5]
  )
  assert 'rounds 0.83-1.09' in benchmark_report.format_table(
      {
          **r,
          'device': 'cpu',
          'image_size': 32,
          'dtype': 'float32',
          'model_width': 1.0,
          'batch_size': 8,
          'jax_step_seconds': 1.0,
          'flops_per_image': 1.0,
          'achieved_flops': 1.0,
          'peak_flops': 2.0,
          'mfu': 0.5,
      }
  )


def test_results_name_the_machine_and_library_releases_they_came_from():
  import datetime
  import platform

  import jax
  import torch

  m = benchmark_report.machine()
  release = lambda module: module.__version__.split('+')[
      0
  ]  # the installed distribution's, without a local tag (+cu130)
  assert m['versions']['jax'] == release(jax) and m['versions']['torch'] == release(torch)
  assert m['host_cpus'] == len(os.sched_getaffinity(0))
  assert m['date'] == datetime.date.today().isoformat()
  with open('/proc/cpuinfo') as f:  # Linux on x86, as CI: the CPU's own model name
    cpuinfo = f.read()
  if 'model name' in cpuinfo:
    assert f'model name\t: {m["host_cpu"]}\n' in cpuinfo
  else:  # e.g. aarch64, whose /proc/cpuinfo has no model name
    assert m['host_cpu'] == (platform.processor() or platform.machine())
  table = benchmark_report.format_table(
      {
          **m,
          'device': '1x cpu',
          'image_size': 32,
          'dtype': 'float32',
          'model_width': 1.0,
          'batch_size': 8,
          'jax_step_images_per_sec': 1.0,
          'jax_step_seconds': 8.0,
          'flops_per_image': 1.0,
          'achieved_flops': 1.0,
          'peak_flops': 2.0,
          'mfu': 0.5,
      }
  )
  assert table.splitlines()[1] == (
      f"  on {m['host_cpu']} ({m['host_cpus']} CPUs), jax {release(jax)}, "
      f"torch {release(torch)}, {m['date']}"
  )


def _says_its_pid_and_sleeps(queue):
  queue.put(os.getpid())
  time.sleep(600)


def _benchmark(queue):
  benchmark.isolated(_says_its_pid_and_sleeps, queue)


def test_a_measurement_ends_when_the_benchmark_is_killed_outright(still_running):
  # kill -9 or the OOM killer: the benchmark cannot end its measurement, which went on holding
  # the accelerator's memory (isolated() ends it on Ctrl-C and SIGTERM).
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  bench = ctx.Process(target=_benchmark, args=(queue,))
  bench.start()
  measurement = queue.get(timeout=120)
  bench.kill()
  bench.join(60)
  assert not still_running([measurement])
