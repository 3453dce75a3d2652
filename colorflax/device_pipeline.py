"""From the features cache to model-ready batches, on the device.

The host does no per-step image work. The cache's uint8 images and float32 embeddings are put
on the device(s) once when they fit (`ResidentFeeder`); otherwise grain streams each batch
from the memory-mapped cache (`colorflax.streaming`). Both feed the same jitted code the same
rows in the same order, so they train identically.

Inside the step (`lab_batch`): gather by index, augment (training only), RGB -> Lab with
`colorflax.color`, and normalise (L/100 in, ab/128 target).
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from colorflax import augment, color, distributed
from colorflax.errors import UserError


def split_indices(n, val_fraction, seed):
  """Seeded train/validation split of the cache rows (each part sorted, for locality)."""
  if n < 2:
    raise UserError(f'the cache holds {n} image(s); training needs at least 2 (one for validation)')
  perm = np.random.default_rng([seed, 0x5_1177]).permutation(n)
  n_val = min(max(1, int(round(n * val_fraction))), n - 1)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(n_train, seed, epoch):
  """The training rows' order in `epoch`: a function of (seed, epoch) only, so that resuming
  replays it."""
  return np.random.default_rng([seed, epoch, 0xE90C]).permutation(n_train).astype(np.int32)


def lab_batch(images_uint8, key, augment_config, train):
  """uint8 RGB (B, H, W, 3) -> (L/100 (B, H, W, 1), ab/128 (B, H, W, 2), rgb (B, H, W, 3))."""
  rgb = color.uint8_to_unit(images_uint8)
  if train:
    a = augment_config
    rgb = augment.random_affine(
        key, rgb, a.rotation_degrees, a.shear, a.flip_probability, a.fill_mode
    )
    rgb = jnp.clip(rgb, 0.0, 1.0)
  l_norm, ab_norm = color.normalize_lab(color.rgb_to_lab(rgb))
  return l_norm, ab_norm, rgb


def _available_device_bytes(device):
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  # CPU: device memory is host memory.
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


PLACEMENTS = ('auto', 'resident', 'streaming')  # data.placement


def decide_resident(mode, nbytes, budget_fraction):
  """'resident' | 'streaming' for a dataset of `nbytes` (replicated on every device)."""
  if mode in ('resident', 'streaming'):
    return mode
  limit = budget_fraction * min(_available_device_bytes(d) for d in jax.local_devices())
  return 'resident' if nbytes <= limit else 'streaming'


def global_array(host, sharding):
  """A global jax.Array from a host array every process can read (works multi-process)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.asarray(host[idx]))


def dispatch_sizes(first_step, last_step, k):
  """Steps per dispatch for steps [first_step, last_step) of an epoch: K each, the last shorter."""
  return [min(k, last_step - s) for s in range(first_step, last_step, k)]


class InFlight:
  """Bounds how far the host runs ahead of the device. JAX dispatches asynchronously, so a loop
  that puts batches on the device and never reads a result queues every batch of a split, and
  holds them all in device (or, on CPU, host) memory while the device catches up. `add` each
  dispatch's output: once more than `depth` are queued, it waits for the oldest, which leaves
  the device `depth` dispatches of work while the host prepares the next."""

  def __init__(self, depth=2):
    self.depth, self._queued = depth, collections.deque()

  def add(self, output):
    self._queued.append(output)
    if len(self._queued) > self.depth:
      jax.block_until_ready(self._queued.popleft())


def gather(tables, x):
  """(images, embeddings) of one batch: rows `x` of the resident tables, or `x` itself when
  the batch was streamed in (tables is None)."""
  if tables is None:
    return x
  images, embeddings = tables
  return images[x], embeddings[x]


class ResidentFeeder:
  """Both splits on every device once; each dispatch sends only its (K, B) indices.

  `train_dispatches` and `eval_batches` yield (tables, x) for `gather`, as
  `streaming.StreamFeeder` does, so the training loop is the same for both.
  """

  def __init__(self, cache, train_rows, val_rows, mesh, config, batch, steps_per_epoch, eval_batch):
    replicated = distributed.replicated(mesh)
    # Gather each split's rows once on the host (one pass over the memmap), then upload.
    self.train = tuple(
        global_array(np.asarray(a[train_rows]), replicated)
        for a in (cache.images, cache.embeddings)
    )
    self.val = tuple(
        global_array(np.asarray(a[val_rows]), replicated) for a in (cache.images, cache.embeddings)
    )
    self.n_train, self.n_val = len(train_rows), len(val_rows)
    self.seed, self.batch, self.steps_per_epoch, self.eval_batch = (
        config.seed,
        batch,
        steps_per_epoch,
        eval_batch,
    )
    self.dispatch_sharding = distributed.dispatch_sharding(mesh)  # (K, B): shard B
    self.batch_sharding = distributed.batch_sharding(mesh)

  def train_dispatches(self, first_step, sizes):
    epoch, pos = divmod(first_step, self.steps_per_epoch)
    order = epoch_order(self.n_train, self.seed, epoch)
    for n in sizes:
      idx = order[pos * self.batch : (pos + n) * self.batch].reshape(n, self.batch)
      yield self.train, global_array(idx, self.dispatch_sharding)
      pos += n

  def eval_batches(self):
    """Validation batches in split order; the last is padded with row 0 (mask it)."""
    for start in range(0, self.n_val, self.eval_batch):
      idx = np.zeros(self.eval_batch, np.int32)
      idx[: min(self.eval_batch, self.n_val - start)] = np.arange(
          start, min(start + self.eval_batch, self.n_val)
      )
      yield self.val, global_array(idx, self.batch_sharding)

  def checkpoint_state(self):
    return None  # nothing beyond the step: the order is a function of (seed, epoch)

  def close(self):
    pass
