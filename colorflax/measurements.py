"""colorflax's own measurements, the JAX side of `colorflax.benchmark`: the training step and its
FLOPs, XLA's matmul peak, a real training epoch, a whole run, and the streaming input pipeline.
Each runs in a child process of the benchmark (its `isolated`), except the streaming one.
"""

import os
import tempfile
import time

import numpy as np

from colorflax import timing


def step_flops(model, tx, config, state, tables, xs, num_devices):
  """XLA's FLOP count of one training step over all `num_devices`, counted on the single-step
  program: XLA's cost analysis does not multiply a while loop's body by its trip count."""
  from colorflax import train_step

  lowered = train_step.make_train_step(model, tx, config).lower(state, tables, xs, 0)
  return program_flops(lowered, num_devices)


def program_flops(lowered, num_devices):
  """FLOPs of a lowered program over all its devices: the unoptimised HLO's count where the
  backend gives one (CPU; None elsewhere), else the compiled program's, which XLA counts for
  one device's partition of the batch."""
  for analysis, scale in (
      (lowered.cost_analysis, 1),
      (lambda: lowered.compile().cost_analysis(), num_devices),
  ):
    cost = analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get('flops'):
      return float(cost['flops']) * scale
  return 0.0


def jax_step(config, repeats):
  """colorflax's K-step dispatch (train_step.make_train_chunk) on device-resident random data:
  images/s and FLOPs."""
  import jax

  from colorflax import distributed, train_step
  from colorflax import model as model_lib

  devices = distributed.run_devices(config)
  mesh = distributed.data_mesh(devices)
  replicated = distributed.replicated(mesh)
  batch = distributed.global_batch_size(config, len(devices))
  k, s = config.steps_per_dispatch, config.data.image_size
  model = model_lib.model_from_config(config)
  tx, plateau = train_step.make_optimizer(config)
  state = train_step.create_state(config, model, tx, plateau, replicated)
  n = max(4 * batch, 64)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), replicated)
  emb = jax.device_put(rng.normal(size=(n, model.embedding_dim)).astype(np.float32), replicated)
  idx = rng.integers(0, n, (k, batch)).astype(np.int32)
  idx = jax.device_put(idx, distributed.dispatch_sharding(mesh))
  flops_per_image = step_flops(model, tx, config, state, (images, emb), idx, len(devices)) / batch
  chunk = train_step.make_train_chunk(model, tx, config)  # compiled by the warm-up run
  holder = {'state': state}

  def run():
    holder['state'], losses = chunk(holder['state'], (images, emb), idx)
    jax.block_until_ready(losses)

  run()  # warm-up
  seconds = timing.median_time(run, repeats) / k
  return {
      'jax_step_seconds': seconds,
      'jax_step_images_per_sec': batch / seconds,
      'flops_per_image': flops_per_image,
      'batch_size': batch,
      'devices': len(devices),
      'step_loop': train_step.step_loop(config),
      'polyphase_dec3': model.polyphase_dec3,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'platform': devices[0].platform,
      'device': f'{len(devices)}x {devices[0].device_kind}',
  }


def jax_matmul_peak(dtype_name, repeats):
  """Measured FLOP/s of a large square matmul in `dtype` through XLA on the first device."""
  import jax
  import jax.numpy as jnp

  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype_name]
  f = jax.jit(lambda x, y: x @ y)

  def matmul(n):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return lambda: jax.block_until_ready(f(a, b))

  sizes = timing.matmul_sizes(jax.devices()[0].platform)
  return {'jax_matmul_peak_flops': timing.best_matmul_flops(matmul, sizes, repeats)}


def random_cache(cache_dir, config, num_images):
  """A features cache of random images and embeddings at `config`'s sizes (no Inception needed)."""
  from colorflax import cache_writer
  from colorflax.model import EMBEDDING_DIMS

  s, d = config.data.image_size, EMBEDDING_DIMS[config.features.kind]
  writer = cache_writer.CacheWriter(cache_dir, s, d)
  rng = np.random.default_rng(0)
  for start in range(0, num_images, 256):
    n = min(256, num_images - start)
    writer.append(
        rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
        rng.normal(size=(n, d)).astype(np.float32),
        [str(i) for i in range(start, start + n)],
    )
  writer.finish({'image_size': s, 'embedding_dim': d, 'embedding_kind': config.features.kind})
  return cache_dir


def _train_on_cache(config, cache_dir, num_epochs):
  """`num_epochs` of train_and_evaluate on the cache, as `python -m colorflax.train` runs them
  (validation, the plateau and a checkpoint every epoch; no sample grids), in a scratch
  workdir: (the last epoch's metrics, the wall-clock seconds of the whole run)."""
  from colorflax import train

  with tempfile.TemporaryDirectory() as tmp:
    with config.unlocked():
      config.data.cache_dir = cache_dir
      config.num_epochs = num_epochs
      config.samples_every_epochs = 0
    t = time.perf_counter()
    _, last = train.train_and_evaluate(config, os.path.join(tmp, 'work'), progress=False)
    return last, time.perf_counter() - t


def jax_epoch(config, cache_dir):
  """A real training epoch of colorflax on the cache: images/s."""
  last, _ = _train_on_cache(
      config, cache_dir, 2
  )  # the first epoch includes compilation; the second is the figure
  return {'jax_epoch_images_per_sec': last['images_per_sec']}


def jax_recipe(config, cache_dir, num_epochs):
  """A whole training run of `num_epochs` on the cache, timed end to end."""
  last, seconds = _train_on_cache(config, cache_dir, num_epochs)
  return {'recipe_epochs': last['epoch'], 'recipe_steps': last['step'], 'recipe_seconds': seconds}


def stream_throughput(config, num_images, workers):
  """Images/s the streaming input pipeline delivers as global device arrays, with no training
  step consuming them: grain reading the memory-mapped cache, K-step stacking, host->device."""
  import jax

  from colorflax import device_pipeline, distributed, streaming

  devices = distributed.run_devices(config)
  mesh = distributed.data_mesh(devices)
  batch = distributed.global_batch_size(config, len(devices))
  with tempfile.TemporaryDirectory() as tmp, config.unlocked():
    config.data.stream_workers = workers
    cache_dir = random_cache(os.path.join(tmp, 'cache'), config, num_images)
    train_rows, val_rows = device_pipeline.split_indices(
        num_images, config.data.val_fraction, config.seed
    )
    steps_per_epoch = len(train_rows) // batch
    feeder = streaming.StreamFeeder(
        cache_dir,
        train_rows,
        val_rows,
        mesh,
        config,
        batch,
        steps_per_epoch,
        batch,
        total_steps=2 * steps_per_epoch,
        start_step=0,
    )
    sizes = device_pipeline.dispatch_sizes(0, steps_per_epoch, config.steps_per_dispatch)
    for _, xs in feeder.train_dispatches(0, sizes[:1]):  # worker start-up is not throughput
      jax.block_until_ready(xs)
    t, images = time.perf_counter(), 0
    for _, xs in feeder.train_dispatches(sizes[0], sizes[1:]):
      jax.block_until_ready(xs)
      images += xs[0].shape[0] * xs[0].shape[1]
    seconds = time.perf_counter() - t
    feeder.close()
  return {
      'stream_images_per_sec': images / seconds,
      'stream_images_timed': images,
      'stream_workers': workers,
  }
