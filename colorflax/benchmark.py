"""`python -m colorflax.benchmark [--config CFG] [--json OUT]`: measured speed of the training
step (colorflax vs the PyTorch reference), of a whole training epoch, and against the device's
measured matmul peak (MFU): the faster of XLA's and PyTorch's large matmul in the same dtype.

Timings are medians of several repeats after compilation/warm-up, with device synchronisation.
colorflax runs on one device unless `--config.num_devices` asks for more, as the PyTorch
reference and the matmul peak do; on N accelerators MFU is against N times one's peak.
"""

import concurrent.futures
import datetime
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np

from colorflax import cli
from colorflax.errors import UserError

_CONFIG = cli.define_config_flag(default=cli.default_config_path())
_JSON = cli.define_string('json', None, 'Write the results to this JSON file.')
_REPEATS = cli.define_integer('repeats', 5, 'Timed repeats per measurement (the median is reported).',
                              lower_bound=1)
_TORCH = cli.define_bool('torch', True, 'Also time the PyTorch reference step.')
_EPOCH_IMAGES = cli.define_integer('epoch_images', 0, 'Images in the timed epoch (0 = skip the epoch run).')
_STREAM_IMAGES = cli.define_integer('stream_images', 0, 'Images in the streaming input pipeline run (0 = skip it).')
_ROUNDS = cli.define_integer(
    'rounds', 1, 'Alternating (colorflax, PyTorch) step measurements, each in a fresh process; the median '
    "round of each side is reported, so a drift in the machine's speed reaches both sides alike.", lower_bound=1)
_RECIPE_EPOCHS = cli.define_integer(
    'recipe_epochs', 0, 'Also train this many epochs on the --epoch_images images, timed from start to end '
    '(compilation, validation and checkpoints included): the seed recipe is 60 epochs of 7,000 images. '
    '0 = skip it.', lower_bound=0)
_SEED_EPOCH_IMAGES = cli.define_integer(
    'seed_epoch_images', 0, 'Images the seed-style PyTorch epoch times, at most (0 = its whole epoch); its host '
    'pipeline is slow (~90 img/s at 256 px), so a part of the epoch gives its rate sooner.')


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
  return {'date': datetime.date.today().isoformat(), 'host_cpu': _cpu_model(), 'host_cpus': cpus,
          'versions': versions}


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def step_flops(model, tx, config, state, tables, xs, num_devices):
  """XLA's FLOP count of one training step over all `num_devices`, counted on the single-step
  program: XLA's cost analysis does not multiply a while loop's body by its trip count."""
  from colorflax import train
  return program_flops(train.make_train_step(model, tx, config).lower(state, tables, xs, 0), num_devices)


def program_flops(lowered, num_devices):
  """FLOPs of a lowered program over all its devices: the unoptimised HLO's count where the
  backend gives one (CPU; None elsewhere), else the compiled program's, which XLA counts for
  one device's partition of the batch."""
  for analysis, scale in ((lowered.cost_analysis, 1), (lambda: lowered.compile().cost_analysis(), num_devices)):
    cost = analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get('flops'):
      return float(cost['flops']) * scale
  return 0.0


def peak_devices(platform, num_devices):
  """How many times one device's matmul peak the run's devices reach: N accelerators; the
  devices of one CPU share its cores, whose matmul the one-device measurement already used."""
  return 1 if platform == 'cpu' else num_devices


def jax_step(config, repeats):
  """colorflax's K-step dispatch (train.make_train_chunk) on device-resident random data:
  images/s and FLOPs."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from colorflax import model as model_lib
  from colorflax import train

  devices = train.run_devices(config)
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
  flops_per_image = step_flops(model, tx, config, state, (images, emb), idx, len(devices)) / batch
  chunk = train.make_train_chunk(model, tx, config)  # compiled by the warm-up run
  holder = {'state': state}

  def run():
    holder['state'], losses = chunk(holder['state'], (images, emb), idx)
    jax.block_until_ready(losses)

  run()  # warm-up
  seconds = _median_time(run, repeats) / k
  return {'jax_step_seconds': seconds, 'jax_step_images_per_sec': batch / seconds,
          'flops_per_image': flops_per_image, 'batch_size': batch, 'devices': len(devices),
          'step_loop': train.step_loop(config), 'polyphase_dec3': model.polyphase_dec3,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'platform': devices[0].platform,
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
    out['torch_step_peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  return out


def _matmul_sizes(platform):
  return (8192,) if platform != 'cpu' else (2048, 4096)  # CPU: XLA peaks at 2048, oneDNN's AMX at 4096


def _best_matmul_flops(matmul, sizes, repeats):
  """max over `sizes` of 2n³ / the median time of matmul(n) (a callable that runs, synchronised)."""
  best = 0.0
  for n in sizes:
    run = matmul(n)
    run()  # warm-up / compilation
    reps = 10 if n <= 2048 else 2
    best = max(best, 2.0 * n ** 3 / (_median_time(lambda: [run() for _ in range(reps)], repeats) / reps))
  return best


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

  return {'jax_matmul_peak_flops': _best_matmul_flops(matmul, _matmul_sizes(jax.devices()[0].platform), repeats)}


def torch_matmul_peak(dtype_name, repeats):
  """The same through PyTorch: on CPUs with AMX its oneDNN reaches bf16 speeds XLA:CPU does not,
  and the device's peak is what the best library on it reaches."""
  import torch
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype_name]
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.set_num_threads(os.cpu_count() or 1)

  def matmul(n):
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    return lambda: (a @ b, sync())

  return {'torch_matmul_peak_flops': _best_matmul_flops(matmul, _matmul_sizes(dev.type), repeats)}


def _random_cache(cache_dir, config, num_images):
  """A features cache of random images and embeddings at `config`'s sizes (no Inception needed)."""
  from colorflax import features_cache
  from colorflax.model import EMBEDDING_DIMS
  s, d = config.data.image_size, EMBEDDING_DIMS[config.features.kind]
  writer = features_cache.CacheWriter(cache_dir, s, d)
  rng = np.random.default_rng(0)
  for start in range(0, num_images, 256):
    n = min(256, num_images - start)
    writer.append(rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                  rng.normal(size=(n, d)).astype(np.float32), [str(i) for i in range(start, start + n)])
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
  last, _ = _train_on_cache(config, cache_dir, 2)  # the first epoch includes compilation; the second is the figure
  return {'jax_epoch_images_per_sec': last['images_per_sec']}


def jax_recipe(config, cache_dir, num_epochs):
  """A whole training run of `num_epochs` on the cache, timed end to end."""
  last, seconds = _train_on_cache(config, cache_dir, num_epochs)
  return {'recipe_epochs': last['epoch'], 'recipe_steps': last['step'], 'recipe_seconds': seconds}


class _SeedDataset:
  """The prototype's input pipeline over a cache's images: PIL image -> torchvision RandomAffine
  (rotation, shear) + horizontal flip on the host -> float tensor in [0, 1] (HWC)."""

  def __init__(self, images, config):
    import torchvision.transforms as T
    a = config.augment
    self.images = images
    shear = float(np.degrees(np.arctan(a.shear)))  # torchvision takes shear in degrees
    self.transform = T.Compose([T.RandomAffine(a.rotation_degrees, shear=shear),
                                T.RandomHorizontalFlip(a.flip_probability)])

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    from PIL import Image
    image = self.transform(Image.fromarray(np.asarray(self.images[i])))
    return np.asarray(image, np.float32) / 255.0


def seed_pipeline_epoch(config, cache_dir, train_rows, max_images=0):
  """One epoch of a seed-style PyTorch training loop over the cache's training images: host
  augmentation in a DataLoader, per-batch RGB->Lab with scikit-image, Inception-v3 recomputed on
  every batch (grayscale stacked x3 at the training size, as the prototype did), then the
  reference model's forward/backward/Adam step (channels-first as the prototype; float32, or
  AMP bfloat16 when the config's dtype is bfloat16, as the PyTorch step). `max_images` > 0
  stops the timing after that many images (whole batches)."""
  import torch
  import torchvision
  from skimage import color as skcolor

  from colorflax.reference import EncDec

  if config.model.width != 1.0:
    return {}  # the reference exists at the seed's width only
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  images = np.load(os.path.join(cache_dir, 'images.npy'), mmap_mode='r')
  loader = torch.utils.data.DataLoader(_SeedDataset(images[np.sort(train_rows)], config),
                                       batch_size=config.batch_size, shuffle=True, drop_last=True)
  inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).to(dev).eval()
  model = EncDec(1000).to(dev)
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  amp = config.model.dtype == 'bfloat16'

  def step(rgb):
    lab = skcolor.rgb2lab(rgb.numpy())  # per batch, on the host
    L = torch.from_numpy(lab[..., :1] / 100.0).float().permute(0, 3, 1, 2).to(dev)
    ab = torch.from_numpy(lab[..., 1:] / 128.0).float().permute(0, 3, 1, 2).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      with torch.no_grad():
        gray = L.expand(-1, 3, -1, -1)
        if gray.shape[-1] < 75:  # Inception-v3's smallest input
          gray = torch.nn.functional.interpolate(gray, size=(75, 75), mode='bilinear')
        embedding = inception(gray)
      opt.zero_grad(set_to_none=True)
      prediction = model(L, embedding)
      loss = torch.nn.functional.mse_loss(prediction.float(), ab)
    loss.backward()
    opt.step()
    return prediction.dtype

  batches = iter(loader)
  compute_dtype = step(next(batches))  # warm-up (allocator, thread pools)
  if dev.type == 'cuda':
    torch.cuda.synchronize()
  t, n = time.perf_counter(), 0
  for rgb in batches:
    step(rgb)
    n += len(rgb)
    if max_images and n >= max_images:
      break  # before loading a batch that would not be counted
  if dev.type == 'cuda':
    torch.cuda.synchronize()
  out = {'seed_pipeline_epoch_images_per_sec': n / (time.perf_counter() - t), 'seed_pipeline_epoch_images': n,
         'seed_pipeline_compute_dtype': str(compute_dtype).removeprefix('torch.')}
  if dev.type == 'cuda':
    out['seed_pipeline_peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  return out


def stream_throughput(config, num_images, workers):
  """Images/s the streaming input pipeline delivers as global device arrays, with no training
  step consuming them: grain reading the memory-mapped cache, K-step stacking, host->device."""
  import jax

  from colorflax import device_pipeline, streaming, train

  devices = train.run_devices(config)
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  batch = train.global_batch_size(config, len(devices))
  with tempfile.TemporaryDirectory() as tmp, config.unlocked():
    config.data.stream_workers = workers
    cache_dir = _random_cache(os.path.join(tmp, 'cache'), config, num_images)
    train_rows, val_rows = device_pipeline.split_indices(num_images, config.data.val_fraction, config.seed)
    steps_per_epoch = len(train_rows) // batch
    feeder = streaming.StreamFeeder(cache_dir, train_rows, val_rows, mesh, config, batch, steps_per_epoch, batch,
                                    total_steps=2 * steps_per_epoch, start_step=0)
    sizes = device_pipeline.dispatch_sizes(0, steps_per_epoch, config.steps_per_dispatch)
    for _, xs in feeder.train_dispatches(0, sizes[:1]):  # worker start-up is not throughput
      jax.block_until_ready(xs)
    t, images = time.perf_counter(), 0
    for _, xs in feeder.train_dispatches(sizes[0], sizes[1:]):
      jax.block_until_ready(xs)
      images += xs[0].shape[0] * xs[0].shape[1]
    seconds = time.perf_counter() - t
    feeder.close()
  return {'stream_images_per_sec': images / seconds, 'stream_images_timed': images, 'stream_workers': workers}


def epochs(config, num_images, with_torch, seed_epoch_images=0, recipe_epochs=0):
  """colorflax's training epoch and the seed-style PyTorch epoch, on the same random images;
  and a whole run of `recipe_epochs` on them."""
  from colorflax import device_pipeline
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = _random_cache(os.path.join(tmp, 'cache'), config, num_images)
    train_rows, _ = device_pipeline.split_indices(num_images, config.data.val_fraction, config.seed)
    out = {'epoch_train_images': len(train_rows)}
    out.update(_isolated('jax_epoch', config, cache_dir))
    if with_torch:
      try:  # keep colorflax's epoch if the PyTorch side cannot run (e.g. no scikit-image)
        out.update(_isolated('seed_pipeline_epoch', config, cache_dir, train_rows, seed_epoch_images))
      except Exception as e:
        out['seed_pipeline_error'] = f'{type(e).__name__}: {e}'
        print(f'seed-style epoch failed: {out["seed_pipeline_error"]}')
    if recipe_epochs:  # last: the longest, and the figures above are kept if it fails
      try:
        out.update(_isolated('jax_recipe', config, cache_dir, recipe_epochs))
      except Exception as e:
        out['recipe_error'] = f'{type(e).__name__}: {e}'
        print(f'whole run failed: {out["recipe_error"]}')
  if 'seed_pipeline_epoch_images_per_sec' in out:
    out['epoch_ratio'] = out['jax_epoch_images_per_sec'] / out['seed_pipeline_epoch_images_per_sec']
  return out


_MEMORY_PREFIX = {'jax_step': 'jax_step', 'torch_step': 'torch_step', 'jax_epoch': 'jax_epoch',
                  'jax_recipe': 'recipe', 'seed_pipeline_epoch': 'seed_pipeline'}


def _measure_in_child(name, args):
  out = globals()[name](*args)
  prefix = _MEMORY_PREFIX.get(name)
  if prefix is None:
    return out
  out[f'{prefix}_peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  if name.startswith('jax'):
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      out[f'{prefix}_peak_device_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def _isolated(name, *args):
  """Measurement `name` of this module in a fresh process, so its peak memory is its own."""
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
    return pool.submit(_measure_in_child, name, args).result()


def _median_run(runs, key):
  """The run whose `key` is the median (the lower middle one of an even count), all its figures."""
  return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def step_rounds(config, repeats, with_torch, rounds):
  """colorflax's and PyTorch's steps, measured in `rounds` alternating pairs of processes."""
  jax_runs, torch_runs = [], []
  for _ in range(rounds):
    jax_runs.append(_isolated('jax_step', config, repeats))
    if with_torch:
      torch_runs.append(_isolated('torch_step', config, repeats))
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
  split = lambda n: len(device_pipeline.split_indices(n, config.data.val_fraction, config.seed)[0]) if n > 1 else 0
  if split(epoch_images) >= 2 * config.batch_size:
    return
  enough = next(n for n in itertools.count(epoch_images) if split(n) >= 2 * config.batch_size)
  raise UserError(f'--epoch_images={epoch_images} leaves {split(epoch_images)} training images, fewer than 2 '
                  f'batches of {config.batch_size}: the seed-style epoch warms up on its first batch and times '
                  f'the rest; use --epoch_images={enough} or more (or --notorch)')


def run(config, repeats=5, with_torch=True, epoch_images=0, stream_images=0, seed_epoch_images=0, rounds=1,
        recipe_epochs=0):
  if recipe_epochs and not epoch_images:
    raise UserError(f'--recipe_epochs={recipe_epochs} trains on the --epoch_images images: give both, '
                    f'e.g. --epoch_images=7000 for the seed recipe')
  if epoch_images and with_torch:
    check_epoch_images(config, epoch_images)
  with config.unlocked():  # one device against PyTorch's one, unless asked (also for the epoch run)
    config.num_devices = config.num_devices or 1
  results = {**machine(), 'image_size': config.data.image_size, 'dtype': config.model.dtype,
             'model_width': config.model.width, 'steps_per_dispatch': config.steps_per_dispatch}
  results.update(step_rounds(config, repeats, with_torch, rounds))
  # Each in a child, outside the step measurements' memory; and on a GPU, JAX in this process
  # would hold the memory the epoch runs need.
  results.update(_isolated('jax_matmul_peak', config.model.dtype, repeats))
  if with_torch:
    results.update(_isolated('torch_matmul_peak', config.model.dtype, repeats))
  device_peak = results['device_peak_flops'] = max(results['jax_matmul_peak_flops'],
                                                    results.get('torch_matmul_peak_flops', 0.0))
  peak = results['peak_flops'] = device_peak * peak_devices(results['platform'], results['devices'])
  results['achieved_flops'] = results['flops_per_image'] * results['jax_step_images_per_sec']
  results['mfu'] = results['achieved_flops'] / peak if peak else 0.0
  if epoch_images:
    try:
      results.update(epochs(config, epoch_images, with_torch, seed_epoch_images, recipe_epochs))
    except Exception as e:  # keep the step figures even if the epoch run fails
      results['epoch_error'] = f'{type(e).__name__}: {e}'
  if stream_images:  # last: it starts JAX in this process (grain's workers are its children)
    results.update(stream_throughput(config, stream_images, config.data.stream_workers))
    results['stream_margin'] = results['stream_images_per_sec'] / results['jax_step_images_per_sec']
  return results


def _memory(r, prefix):
  """' peak 1.2 GB device' / ' peak RSS 3.4 GB' for a measurement, or '' if not measured.
  colorflax's figure on several devices is the first device's (each holds its share)."""
  if f'{prefix}_peak_device_bytes' in r:
    each = 'per device' if r.get('devices', 1) > 1 and prefix not in ('torch_step', 'seed_pipeline') else 'device'
    return f"  peak {r[f'{prefix}_peak_device_bytes'] / 1e9:.2f} GB {each}"
  if f'{prefix}_peak_rss_bytes' in r:
    return f"  peak RSS {r[f'{prefix}_peak_rss_bytes'] / 1e9:.2f} GB"
  return ''


def _peak_sources(r):
  """' (XLA 0.29, PyTorch 0.36)' when both frameworks' matmuls were timed."""
  if 'torch_matmul_peak_flops' not in r:
    return ''
  return f" (XLA {r['jax_matmul_peak_flops'] / 1e12:.2f}, PyTorch {r['torch_matmul_peak_flops'] / 1e12:.2f})"


def _machine_line(r):
  """['  on AMD EPYC (2 CPUs), jax 0.10.2, torch 2.14.1, 2026-11-28'], or [] for results without it."""
  if 'host_cpu' not in r:
    return []
  libs = ''.join(f", {name} {r['versions'][name]}" for name in ('jax', 'torch') if name in r['versions'])
  return [f"  on {r['host_cpu']} ({r['host_cpus']} CPUs){libs}, {r['date']}"]


def format_table(r):
  accelerators = peak_devices(r.get('platform', 'cpu'), r.get('devices', 1))  # older results: one device
  lines = [f"{r['device']}, {r['image_size']} px, global batch {r['batch_size']}, {r['dtype']}, width {r['model_width']}",
           *_machine_line(r),
           f"  colorflax step   {r['jax_step_images_per_sec']:10.1f} img/s  ({r['jax_step_seconds'] * 1e3:.2f} ms/step)"
           + _memory(r, 'jax_step')]
  if 'torch_step_images_per_sec' in r:
    rounds = r.get('step_ratio_rounds')
    spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if rounds else ''
    one = ' on 1 device' if accelerators > 1 else ''
    lines.append(f"  PyTorch step     {r['torch_step_images_per_sec']:10.1f} img/s{one}  ratio {r['step_ratio']:.2f}{spread}"
                 + _memory(r, 'torch_step'))
  times = f"{accelerators} x " if accelerators > 1 else ''
  lines.append(f"  FLOPs/image {r['flops_per_image'] / 1e9:.1f} G; achieved {r['achieved_flops'] / 1e12:.2f} TFLOP/s; "
               f"matmul peak {times}{r['peak_flops'] / accelerators / 1e12:.2f} TFLOP/s{_peak_sources(r)}; "
               f"MFU {100 * r['mfu']:.1f}%")
  if 'stream_images_per_sec' in r:
    lines.append(f"  streaming input  {r['stream_images_per_sec']:10.1f} img/s  ({r['stream_workers']} grain workers; "
                 f"{r['stream_margin']:.1f}x what the step consumes)")
  if 'jax_epoch_images_per_sec' in r:
    lines.append(f"  colorflax epoch  {r['jax_epoch_images_per_sec']:10.1f} img/s over {r['epoch_train_images']} images"
                 + _memory(r, 'jax_epoch'))
  if 'seed_pipeline_epoch_images_per_sec' in r:
    lines.append(f"  seed-style epoch {r['seed_pipeline_epoch_images_per_sec']:10.1f} img/s  ratio {r['epoch_ratio']:.2f}"
                 f"  ({r['seed_pipeline_epoch_images']} images timed, {r['seed_pipeline_compute_dtype']})"
                 + _memory(r, 'seed_pipeline'))
  if 'recipe_seconds' in r:
    lines.append(f"  whole run        {r['recipe_seconds']:10.1f} s for {r['recipe_epochs']} epochs of {r['epoch_train_images']} "
                 f"images ({r['recipe_seconds'] / 60:.1f} min; compilation, validation, checkpoints included)"
                 + _memory(r, 'recipe'))
  if 'recipe_error' in r:
    lines.append(f"  whole run failed: {r['recipe_error']}")
  if 'epoch_error' in r:
    lines.append(f"  epoch run failed: {r['epoch_error']}")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(_CONFIG)
  json_path = cli.output_file(_JSON.value, 'json')
  results = run(config, _REPEATS.value, _TORCH.value, _EPOCH_IMAGES.value, _STREAM_IMAGES.value,
                _SEED_EPOCH_IMAGES.value, _ROUNDS.value, _RECIPE_EPOCHS.value)
  print(format_table(results))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=2)


def entry_point():
  cli.run(main)


if __name__ == '__main__':
  entry_point()
