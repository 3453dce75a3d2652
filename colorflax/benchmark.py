"""`python -m colorflax.benchmark [--config CFG] [--json OUT]`: measured speed of the training
step (colorflax vs the PyTorch reference), of a whole training epoch, and against the device's
measured matmul peak (MFU): the faster of XLA's and PyTorch's large matmul in the same dtype.

Timings are medians of several repeats after compilation/warm-up, with device synchronisation.
colorflax runs on one device unless `--config.num_devices` asks for more, as the PyTorch
reference and the matmul peak do; on N accelerators MFU is against N times one's peak.
"""

import itertools
import json
import multiprocessing
import os
import resource
import tempfile

from absl import flags as absl_flags

from colorflax import cli, files, measurements, signals
from colorflax.benchmark_report import format_table, machine, peak_devices
from colorflax.errors import UserError


def epochs(config, num_images, with_torch, seed_epoch_images=0, recipe_epochs=0, measure=None):
  """colorflax's training epoch and the seed-style PyTorch epoch, on the same random images;
  and a whole run of `recipe_epochs` on them. Each runs through `measure` (default: isolated)."""
  from colorflax import device_pipeline
  from colorflax.reference import benchmark as reference

  measure = measure or isolated
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = measurements.random_cache(os.path.join(tmp, 'cache'), config, num_images)
    train_rows, _ = device_pipeline.split_indices(num_images, config.data.val_fraction, config.seed)
    out = {'epoch_train_images': len(train_rows)}
    out.update(measure(measurements.jax_epoch, config, cache_dir))
    if with_torch:
      try:  # keep colorflax's epoch if the PyTorch side cannot run (e.g. no scikit-image)
        out.update(
            measure(reference.seed_pipeline_epoch, config, cache_dir, train_rows, seed_epoch_images)
        )
      except Exception as e:
        out['seed_pipeline_error'] = f'{type(e).__name__}: {e}'
        print(f'seed-style epoch failed: {out["seed_pipeline_error"]}')
    if recipe_epochs:  # last: the longest, and the figures above are kept if it fails
      try:
        out.update(measure(measurements.jax_recipe, config, cache_dir, recipe_epochs))
      except Exception as e:
        out['recipe_error'] = f'{type(e).__name__}: {e}'
        print(f'whole run failed: {out["recipe_error"]}')
  if 'seed_pipeline_epoch_images_per_sec' in out:
    out['epoch_ratio'] = out['jax_epoch_images_per_sec'] / out['seed_pipeline_epoch_images_per_sec']
  return out


# Where each measurement's peak memory goes in the results.
_MEMORY_PREFIX = {
    'jax_step': 'jax_step',
    'torch_step': 'torch_step',
    'jax_epoch': 'jax_epoch',
    'jax_recipe': 'recipe',
    'seed_pipeline_epoch': 'seed_pipeline',
}


def _measure(fn, args):
  out = fn(*args)
  prefix = _MEMORY_PREFIX.get(fn.__name__)
  if prefix is None:
    return out
  # Linux reports KiB.
  out[f'{prefix}_peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if fn.__name__.startswith('jax'):
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      out[f'{prefix}_peak_device_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def _measure_in_child(fn, args, send):
  """The child's side of `isolated`: (True, the figures) or (False, the exception) on `send`."""
  signals.exit_with_parent()  # a benchmark killed outright: its measurement (a GPU's memory) too
  try:
    result = (True, _measure(fn, args))
  except BaseException as e:  # noqa: BLE001 - the parent re-raises it
    result = (False, e)
  try:
    send.send(result)
  except Exception:  # an exception that does not pickle
    send.send((False, RuntimeError(f'{type(result[1]).__name__}: {result[1]}')))


def isolated(fn, *args):
  """fn(*args), a measurement, in a fresh process, so that its peak memory is its own. Stopped
  (Ctrl-C, SIGTERM), the measurement is ended with it, not left running."""
  context = multiprocessing.get_context('spawn')
  receive, send = context.Pipe(duplex=False)
  child = context.Process(target=_measure_in_child, args=(fn, args, send), name=fn.__name__)
  child.start()
  send.close()
  try:
    ok, value = receive.recv()
  except EOFError:  # it died (out of memory?) before it could answer
    child.join()
    raise RuntimeError(f'{fn.__name__} died (exit code {child.exitcode})') from None
  except BaseException:  # a stop: the measurement ends with the benchmark
    child.terminate()
    raise
  finally:
    child.join()
    receive.close()
  if not ok:
    raise value
  return value


def _median_run(runs, key):
  """The run whose `key` is the median (the lower middle one of an even count), all its figures."""
  return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def step_rounds(config, repeats, with_torch, rounds, measure=None):
  """colorflax's and PyTorch's steps, measured in `rounds` alternating pairs of processes."""
  from colorflax.reference import benchmark as reference

  measure = measure or isolated
  jax_runs, torch_runs = [], []
  for _ in range(rounds):
    jax_runs.append(measure(measurements.jax_step, config, repeats))
    if with_torch:
      torch_runs.append(measure(reference.torch_step, config, repeats))
  out = dict(_median_run(jax_runs, 'jax_step_images_per_sec'))
  jax_ips = [r['jax_step_images_per_sec'] for r in jax_runs]
  torch_runs = [r for r in torch_runs if r]  # {}: no reference at this width
  if torch_runs:
    out.update(_median_run(torch_runs, 'torch_step_images_per_sec'))
    out['step_ratio'] = out['jax_step_images_per_sec'] / out['torch_step_images_per_sec']
  if rounds > 1:
    out['jax_step_images_per_sec_rounds'] = jax_ips
    if torch_runs:
      torch_ips = [r['torch_step_images_per_sec'] for r in torch_runs]
      out['torch_step_images_per_sec_rounds'] = torch_ips
      out['step_ratio_rounds'] = [j / t for j, t in zip(jax_ips, torch_ips)]
  return out


def check_epoch_images(config, epoch_images):
  """Up front, before any measurement: the seed-style epoch warms up on its first batch and times
  the rest, so its training split needs at least two batches."""
  from colorflax import device_pipeline

  split = (
      lambda n: len(device_pipeline.split_indices(n, config.data.val_fraction, config.seed)[0])
      if n > 1
      else 0
  )
  if split(epoch_images) >= 2 * config.batch_size:
    return
  enough = next(n for n in itertools.count(epoch_images) if split(n) >= 2 * config.batch_size)
  raise UserError(
      f'--epoch_images={epoch_images} leaves {split(epoch_images)} training images, fewer than 2 '
      f'batches of {config.batch_size}: the seed-style epoch warms up on its first batch and times '
      f'the rest; use --epoch_images={enough} or more (or --notorch)'
  )


def run(
    config,
    repeats=5,
    with_torch=True,
    epoch_images=0,
    stream_images=0,
    seed_epoch_images=0,
    rounds=1,
    recipe_epochs=0,
    measure=None,
):
  """Every measurement the arguments ask for, each through `measure(fn, *args)` (default:
  `isolated`, a fresh process); the results as one dict (benchmark_report.format_table)."""
  from colorflax.reference import benchmark as reference

  measure = measure or isolated
  if recipe_epochs and not epoch_images:
    raise UserError(
        f'--recipe_epochs={recipe_epochs} trains on the --epoch_images images: give '
        f'both, e.g. --epoch_images=7000 for the seed recipe'
    )
  if epoch_images and with_torch:
    check_epoch_images(config, epoch_images)
  with config.unlocked():  # one device against PyTorch's one, unless asked (also for the epochs)
    config.num_devices = config.num_devices or 1
  results = {
      **machine(),
      'image_size': config.data.image_size,
      'dtype': config.model.dtype,
      'model_width': config.model.width,
      'steps_per_dispatch': config.steps_per_dispatch,
  }
  results.update(step_rounds(config, repeats, with_torch, rounds, measure))
  # Each in a child, outside the step measurements' memory; and on a GPU, JAX in this process
  # would hold the memory the epoch runs need.
  results.update(measure(measurements.jax_matmul_peak, config.model.dtype, repeats))
  if with_torch:
    results.update(measure(reference.torch_matmul_peak, config.model.dtype, repeats))
  device_peak = max(results['jax_matmul_peak_flops'], results.get('torch_matmul_peak_flops', 0.0))
  peak = device_peak * peak_devices(results['platform'], results['devices'])
  results.update(device_peak_flops=device_peak, peak_flops=peak)
  results['achieved_flops'] = results['flops_per_image'] * results['jax_step_images_per_sec']
  results['mfu'] = results['achieved_flops'] / peak if peak else 0.0
  if epoch_images:
    try:
      results.update(
          epochs(config, epoch_images, with_torch, seed_epoch_images, recipe_epochs, measure)
      )
    except Exception as e:  # keep the step figures even if the epoch run fails
      results['epoch_error'] = f'{type(e).__name__}: {e}'
  if stream_images:  # last: it starts JAX in this process (grain's workers are its children)
    workers = config.data.stream_workers
    results.update(measurements.stream_throughput(config, stream_images, workers))
    results['stream_margin'] = results['stream_images_per_sec'] / results['jax_step_images_per_sec']
  return results


def define_flags(flags):
  cli.define_config(flags, default=cli.default_config_path())
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string('json', None, 'Write the results to this JSON file.', **define)
  absl_flags.DEFINE_integer(
      'repeats',
      5,
      'Timed repeats per measurement (the median is reported).',
      lower_bound=1,
      **define,
  )
  absl_flags.DEFINE_bool('torch', True, 'Also time the PyTorch reference step.', **define)
  absl_flags.DEFINE_integer(
      'epoch_images',
      0,
      'Images in the timed epoch (0 = skip the epoch run).',
      lower_bound=0,
      **define,
  )
  absl_flags.DEFINE_integer(
      'stream_images',
      0,
      'Images in the streaming input pipeline run (0 = skip it).',
      lower_bound=0,
      **define,
  )
  absl_flags.DEFINE_integer(
      'rounds',
      1,
      'Alternating (colorflax, PyTorch) step measurements, each in a fresh process; the '
      "median round of each side is reported, so a drift in the machine's speed reaches both sides "
      'alike.',
      lower_bound=1,
      **define,
  )
  absl_flags.DEFINE_integer(
      'recipe_epochs',
      0,
      'Also train this many epochs on the --epoch_images images, timed from '
      'start to end (compilation, validation and checkpoints included): the seed recipe is 60 '
      'epochs of 7,000 images. 0 = skip it.',
      lower_bound=0,
      **define,
  )
  absl_flags.DEFINE_integer(
      'seed_epoch_images',
      0,
      'Images the seed-style PyTorch epoch times, at most (0 = its whole '
      'epoch); its host pipeline is slow (~90 img/s at 256 px), so a part of the epoch gives its '
      'rate sooner.',
      lower_bound=0,
      **define,
  )


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(flags)
  json_path = cli.output_file(flags.json, 'json')
  if json_path:  # before the measurements, which take minutes
    files.check_writable(os.path.dirname(json_path), 'json')
  results = run(
      config,
      flags.repeats,
      flags.torch,
      flags.epoch_images,
      flags.stream_images,
      flags.seed_epoch_images,
      flags.rounds,
      flags.recipe_epochs,
  )
  if json_path:
    with files.atomic(json_path) as f:
      json.dump(results, f, indent=2)
  signals.work_done()
  print(format_table(results))


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
