"""What `colorflax.benchmark` prints: the machine its figures came from, and the table."""

import datetime
import importlib.metadata
import os
import platform


def peak_devices(platform, num_devices):
  """How many times one device's matmul peak the run's devices reach: N accelerators; the
  devices of one CPU share its cores, whose matmul the one-device measurement already used."""
  return 1 if platform == 'cpu' else num_devices


def machine():
  """Which machine and software the figures came from: the same command gives different numbers
  on another CPU model or library release, and a session's machine is not always the last one's."""
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return {
      'date': datetime.date.today().isoformat(),
      'host_cpu': _cpu_model(),
      'host_cpus': cpus,
      'versions': versions,
  }


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory(r, prefix):
  """' peak 1.2 GB device' / ' peak RSS 3.4 GB' for a measurement, or '' if not measured.
  colorflax's figure on several devices is the first device's (each holds its share)."""
  if f'{prefix}_peak_device_bytes' in r:
    each = (
        'per device'
        if r.get('devices', 1) > 1 and prefix not in ('torch_step', 'seed_pipeline')
        else 'device'
    )
    return f"  peak {r[f'{prefix}_peak_device_bytes'] / 1e9:.2f} GB {each}"
  if f'{prefix}_peak_rss_bytes' in r:
    return f"  peak RSS {r[f'{prefix}_peak_rss_bytes'] / 1e9:.2f} GB"
  return ''


def _peak_sources(r):
  """' (XLA 0.29, PyTorch 0.36)' when both frameworks' matmuls were timed."""
  if 'torch_matmul_peak_flops' not in r:
    return ''
  xla, torch = r['jax_matmul_peak_flops'] / 1e12, r['torch_matmul_peak_flops'] / 1e12
  return f' (XLA {xla:.2f}, PyTorch {torch:.2f})'


def _machine_line(r):
  """['  on AMD EPYC (2 CPUs), jax 0.10.2, torch 2.14.1, 2026-11-28'], or [] for older results."""
  if 'host_cpu' not in r:
    return []
  libs = ''.join(
      f", {name} {r['versions'][name]}" for name in ('jax', 'torch') if name in r['versions']
  )
  return [f"  on {r['host_cpu']} ({r['host_cpus']} CPUs){libs}, {r['date']}"]


def _step_lines(r, accelerators):
  """colorflax's step, PyTorch's, and the FLOPs and MFU they come to."""
  ms = r['jax_step_seconds'] * 1e3
  lines = [
      f"  colorflax step   {r['jax_step_images_per_sec']:10.1f} img/s  ({ms:.2f} ms/step)"
      + _memory(r, 'jax_step')
  ]
  if 'torch_step_images_per_sec' in r:
    rounds = r.get('step_ratio_rounds')
    spread = f' (rounds {min(rounds):.2f}-{max(rounds):.2f})' if rounds else ''
    one = ' on 1 device' if accelerators > 1 else ''
    lines.append(
        f"  PyTorch step     {r['torch_step_images_per_sec']:10.1f} img/s{one}  "
        f"ratio {r['step_ratio']:.2f}{spread}" + _memory(r, 'torch_step')
    )
  times = f'{accelerators} x ' if accelerators > 1 else ''
  peak = r['peak_flops'] / accelerators / 1e12
  lines.append(
      f"  FLOPs/image {r['flops_per_image'] / 1e9:.1f} G; "
      f"achieved {r['achieved_flops'] / 1e12:.2f} TFLOP/s; "
      f'matmul peak {times}{peak:.2f} TFLOP/s{_peak_sources(r)}; '
      f"MFU {100 * r['mfu']:.1f}%"
  )
  return lines


def _epoch_lines(r):
  """The streaming input, the two epochs and the whole run, those that were measured."""
  lines = []
  if 'stream_images_per_sec' in r:
    lines.append(
        f"  streaming input  {r['stream_images_per_sec']:10.1f} img/s  "
        f"({r['stream_workers']} grain workers; {r['stream_margin']:.1f}x what the step consumes)"
    )
  if 'jax_epoch_images_per_sec' in r:
    lines.append(
        f"  colorflax epoch  {r['jax_epoch_images_per_sec']:10.1f} img/s "
        f"over {r['epoch_train_images']} images" + _memory(r, 'jax_epoch')
    )
  if 'seed_pipeline_epoch_images_per_sec' in r:
    lines.append(
        f"  seed-style epoch {r['seed_pipeline_epoch_images_per_sec']:10.1f} img/s  "
        f"ratio {r['epoch_ratio']:.2f}  ({r['seed_pipeline_epoch_images']} images timed, "
        f"{r['seed_pipeline_compute_dtype']})" + _memory(r, 'seed_pipeline')
    )
  if 'recipe_seconds' in r:
    seconds = r['recipe_seconds']
    lines.append(
        f"  whole run        {seconds:10.1f} s for {r['recipe_epochs']} epochs of "
        f"{r['epoch_train_images']} images ({seconds / 60:.1f} min; compilation, validation, "
        'checkpoints included)' + _memory(r, 'recipe')
    )
  return lines


def format_table(r):
  """The results of `benchmark.run` as the lines the command prints."""
  # Results written before the device count was recorded ran on one device.
  accelerators = peak_devices(r.get('platform', 'cpu'), r.get('devices', 1))
  lines = [
      f"{r['device']}, {r['image_size']} px, global batch {r['batch_size']}, {r['dtype']}, "
      f"width {r['model_width']}",
      *_machine_line(r),
      *_step_lines(r, accelerators),
      *_epoch_lines(r),
  ]
  if 'recipe_error' in r:
    lines.append(f"  whole run failed: {r['recipe_error']}")
  if 'epoch_error' in r:
    lines.append(f"  epoch run failed: {r['epoch_error']}")
  return '\n'.join(lines)
