"""`python -m colorflax.benchmark [--config CFG] [--json OUT]`: measured speed of the training
step (colorflax vs the PyTorch reference), of a whole training epoch, and against the device's
measured matmul peak (MFU).

Timings are medians of several repeats after compilation/warm-up, with device synchronisation.
"""

import json
import os
import statistics
import tempfile
import time

import numpy as np

from colorflax import cli
from colorflax.errors import UserError

_CONFIG = cli.define_config_flag(default=cli.default_config_path())
_JSON = cli.define_string('json', None, 'Write the results to this JSON file.')
_REPEATS = cli.define_integer('repeats', 5, 'Timed repeats per measurement (the median is reported).')
_TORCH = cli.define_bool('torch', True, 'Also time the PyTorch reference step.')
_EPOCH_IMAGES = cli.define_integer('epoch_images', 0, 'Images in the timed epoch (0 = skip the epoch run).')


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def step_flops(model, tx, config, state, images, emb, idx_one):
  """XLA's FLOP count of one training step. Counted on the unrolled program: XLA's cost
  analysis does not multiply a while loop's body by its trip count."""
  from colorflax import train
  with config.unlocked():
    one = config.copy_and_resolve_references()
    one.scan_unroll = 'unroll'
  lowered = train.make_train_chunk(model, tx, one).lower(state, images, emb, idx_one)
  for analysis in (lowered.cost_analysis, lambda: lowered.compile().cost_analysis()):
    cost = analysis()  # the unoptimised HLO's count where the backend gives one (CPU), else the compiled one
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get('flops'):
      return float(cost['flops'])
  return 0.0


def jax_step(config, repeats):
  """colorflax's jitted K-step dispatch on device-resident random data: images/s and FLOPs."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from colorflax import model as model_lib
  from colorflax import train

  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = train.global_batch_size(config, len(devices))
  k, s = config.steps_per_dispatch, config.data.image_size
  model = model_lib.model_from_config(config)
  tx, plateau = train.make_optimizer(config)
  state = train.create_state(config, model, tx, plateau, s, replicated)
  n = max(4 * batch, 64)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), replicated)
  emb = jax.device_put(rng.normal(size=(n, model.embedding_dim)).astype(np.float32), replicated)
  idx = jax.device_put(rng.integers(0, n, (k, batch)).astype(np.int32), NamedSharding(mesh, P(None, 'data')))
  chunk = train.make_train_chunk(model, tx, config)
  compiled = chunk.lower(state, images, emb, idx).compile()
  flops_per_image = step_flops(model, tx, config, state, images, emb, idx[:1]) / batch
  holder = {'state': state}

  def run():
    holder['state'], losses = compiled(holder['state'], images, emb, idx)
    jax.block_until_ready(losses)

  run()  # warm-up
  seconds = _median_time(run, repeats) / k
  return {'jax_step_seconds': seconds, 'jax_step_images_per_sec': batch / seconds,
          'flops_per_image': flops_per_image, 'batch_size': batch, 'devices': len(devices),
          'device': f'{len(devices)}x {devices[0].device_kind}'}


def torch_step(config, repeats):
  """The PyTorch reference (same model, init scheme, Adam, MSE), channels_last, AMP bf16 if asked."""
  import torch

  from colorflax.model import EMBEDDING_DIMS
  from colorflax.reference import EncDec

  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.set_num_threads(os.cpu_count() or 1)
  if config.model.width != 1.0:
    return {}  # the reference exists at the seed's width only
  s, b = config.data.image_size, config.batch_size
  model = EncDec(EMBEDDING_DIMS[config.features.kind]).to(dev, memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  L = torch.rand(b, 1, s, s, device=dev).to(memory_format=torch.channels_last)
  e = torch.randn(b, model.dec1[0].in_channels - 256, device=dev)
  ab = torch.rand(b, 2, s, s, device=dev) * 2 - 1
  amp = config.model.dtype == 'bfloat16'

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      loss = torch.nn.functional.mse_loss(model(L, e).float(), ab)
    loss.backward()
    opt.step()
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  for _ in range(3):
    run()
  seconds = _median_time(run, repeats)
  out = {'torch_step_seconds': seconds, 'torch_step_images_per_sec': b / seconds}
  if dev.type == 'cuda':
    out['torch_peak_memory_bytes'] = int(torch.cuda.max_memory_allocated())
  return out


def matmul_peak(dtype_name, repeats):
  """Measured FLOP/s of a large square matmul in `dtype` on the first device."""
  import jax
  import jax.numpy as jnp
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype_name]
  n = 8192 if jax.devices()[0].platform != 'cpu' else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, b))
  reps = 10
  seconds = _median_time(lambda: jax.block_until_ready([f(a, b) for _ in range(reps)]), repeats) / reps
  return 2.0 * n ** 3 / seconds


def jax_epoch(config, num_images):
  """A real training epoch (train_and_evaluate) on a cache of random images: images/s."""
  from colorflax import features_cache, train
  from colorflax.model import EMBEDDING_DIMS

  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = os.path.join(tmp, 'cache')
    s, d = config.data.image_size, EMBEDDING_DIMS[config.features.kind]
    writer = features_cache.CacheWriter(cache_dir, s, d)
    rng = np.random.default_rng(0)
    for start in range(0, num_images, 256):
      n = min(256, num_images - start)
      writer.append(rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                    rng.normal(size=(n, d)).astype(np.float32), [str(i) for i in range(start, start + n)])
    writer.finish({'image_size': s, 'embedding_dim': d, 'embedding_kind': config.features.kind})
    with config.unlocked():
      config.data.cache_dir = cache_dir
      config.num_epochs = 2  # the first epoch includes compilation; the second is the figure
      config.samples_every_epochs = 0
    _, last = train.train_and_evaluate(config, os.path.join(tmp, 'work'), progress=False)
  return {'jax_epoch_images_per_sec': last['images_per_sec'], 'epoch_train_images': int(num_images * (1 - config.data.val_fraction))}


def run(config, repeats=5, with_torch=True, epoch_images=0):
  results = {'image_size': config.data.image_size, 'dtype': config.model.dtype, 'model_width': config.model.width,
             'steps_per_dispatch': config.steps_per_dispatch}
  results.update(jax_step(config, repeats))
  if with_torch:
    results.update(torch_step(config, repeats))
    if 'torch_step_images_per_sec' in results:
      results['step_ratio'] = results['jax_step_images_per_sec'] / results['torch_step_images_per_sec']
  peak = matmul_peak(config.model.dtype, repeats)
  results['peak_flops'] = peak
  results['achieved_flops'] = results['flops_per_image'] * results['jax_step_images_per_sec']
  results['mfu'] = results['achieved_flops'] / peak if peak else 0.0
  if epoch_images:
    try:
      results.update(jax_epoch(config, epoch_images))
    except Exception as e:  # keep the step figures even if the epoch run fails
      results['epoch_error'] = f'{type(e).__name__}: {e}'
  return results


def format_table(r):
  lines = [f"{r['device']}, {r['image_size']} px, global batch {r['batch_size']}, {r['dtype']}, width {r['model_width']}",
           f"  colorflax step   {r['jax_step_images_per_sec']:10.1f} img/s  ({r['jax_step_seconds'] * 1e3:.2f} ms/step)"]
  if 'torch_step_images_per_sec' in r:
    lines.append(f"  PyTorch step     {r['torch_step_images_per_sec']:10.1f} img/s  ratio {r['step_ratio']:.2f}")
  lines.append(f"  FLOPs/image {r['flops_per_image'] / 1e9:.1f} G; achieved {r['achieved_flops'] / 1e12:.2f} TFLOP/s; "
               f"matmul peak {r['peak_flops'] / 1e12:.2f} TFLOP/s; MFU {100 * r['mfu']:.1f}%")
  if 'jax_epoch_images_per_sec' in r:
    lines.append(f"  training epoch   {r['jax_epoch_images_per_sec']:10.1f} img/s over {r['epoch_train_images']} images")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(_CONFIG)
  results = run(config, _REPEATS.value, _TORCH.value, _EPOCH_IMAGES.value)
  print(format_table(results))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)


def entry_point():
  cli.run(main)


if __name__ == '__main__':
  entry_point()
