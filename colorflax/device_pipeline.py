"""From the features cache to model-ready batches, on the device.

The host does no per-step image work. The cache's uint8 images and float32 embeddings are put
on the device(s) once when they fit (`resident`), otherwise each dispatch's rows are gathered
from the memory-mapped cache by a background thread and sent ahead (`streaming`). Both feed
the same jitted code the same rows in the same order, so they train identically.

Inside the step (`lab_batch`): gather by index, augment (training only), RGB -> Lab with
`colorflax.color`, and normalise (L/100 in, ab/128 target).
"""

import dataclasses
import os
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from colorflax import augment, color
from colorflax.errors import UserError


def split_indices(n, val_fraction, seed):
  """Seeded train/validation split of the cache rows (each part sorted, for locality)."""
  if n < 2:
    raise UserError(f'the cache holds {n} image(s); training needs at least 2 (one for validation)')
  perm = np.random.default_rng([seed, 0x5_1177]).permutation(n)
  n_val = min(max(1, int(round(n * val_fraction))), n - 1)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(n_train, seed, epoch):
  """The training rows' order in `epoch`: a function of (seed, epoch) only, so resuming replays it."""
  return np.random.default_rng([seed, epoch, 0xE90C]).permutation(n_train).astype(np.int32)


def lab_batch(images_uint8, key, augment_config, train):
  """uint8 RGB (B, H, W, 3) -> (L/100 (B, H, W, 1), ab/128 (B, H, W, 2), rgb (B, H, W, 3))."""
  rgb = color.uint8_to_unit(images_uint8)
  if train:
    a = augment_config
    rgb = augment.random_affine(key, rgb, a.rotation_degrees, a.shear, a.flip_probability, a.fill_mode)
    rgb = jnp.clip(rgb, 0.0, 1.0)
  l_norm, ab_norm = color.normalize_lab(color.rgb_to_lab(rgb))
  return l_norm, ab_norm, rgb


def _available_device_bytes(device):
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  # CPU: device memory is host memory.
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def decide_resident(mode, nbytes, budget_fraction):
  """'resident' | 'streaming' for a dataset of `nbytes` (replicated on every device)."""
  if mode in ('resident', 'streaming'):
    return mode
  limit = budget_fraction * min(_available_device_bytes(d) for d in jax.local_devices())
  return 'resident' if nbytes <= limit else 'streaming'


def global_array(host, sharding):
  """A global jax.Array from a host array every process can read (works multi-process)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.asarray(host[idx]))


@dataclasses.dataclass
class DeviceData:
  """Rows of the cache for one split, where the jitted step can index them."""
  images: jax.Array | None  # (N, S, S, 3) uint8, replicated; None when streaming
  embeddings: jax.Array | None  # (N, D) float32, replicated; None when streaming
  host_images: np.ndarray  # memory-mapped rows (streaming reads from here)
  host_embeddings: np.ndarray
  rows: np.ndarray  # cache row of each split row
  mode: str

  @property
  def size(self):
    return len(self.rows)


def place(cache, rows, mesh, mode):
  """Puts one split's rows on the devices (resident) or prepares to stream them."""
  rows = np.asarray(rows)
  if mode == 'resident':
    replicated = NamedSharding(mesh, P())
    # Gather this split's rows once on the host (one pass over the memmap), then upload.
    images = global_array(np.asarray(cache.images[rows]), replicated)
    embeddings = global_array(np.asarray(cache.embeddings[rows]), replicated)
    return DeviceData(images, embeddings, cache.images, cache.embeddings, rows, mode)
  return DeviceData(None, None, cache.images, cache.embeddings, rows, mode)


class Feeder:
  """Per dispatch: (images, embeddings, indices) for the jitted step.

  resident: the device arrays and the (K, B) split indices, sharded over the batch axis.
  streaming: the (K*B) rows gathered on the host in a background thread, sent ahead of use,
  with indices arange(K*B) into them, so the step is the same function either way.
  """

  def __init__(self, data: DeviceData, mesh, prefetch=2):
    self.data, self.mesh = data, mesh
    self.batch_sharding = NamedSharding(mesh, P(None, 'data'))  # (K, B): shard B
    self.prefetch = prefetch

  def _indices(self, idx):
    return global_array(idx.astype(np.int32), self.batch_sharding)

  def _stream(self, idx):
    k, b = idx.shape
    # Row r of the block is sample r of the dispatch (step-major), so the indices are arange.
    # The block is replicated on every device: simple and correct, but each device receives all
    # K*B rows (a per-device split is part of the streaming work still to do).
    flat_rows = self.data.rows[idx.reshape(-1)]
    order = np.argsort(flat_rows, kind='stable')  # read the memmap in ascending order
    images = np.empty((k * b, *self.data.host_images.shape[1:]), np.uint8)
    images[order] = self.data.host_images[flat_rows[order]]
    embeddings = np.asarray(self.data.host_embeddings[flat_rows], np.float32)
    spec = NamedSharding(self.mesh, P())
    local = np.arange(k * b, dtype=np.int32).reshape(k, b)
    return (global_array(images, spec), global_array(embeddings, spec), self._indices(local))

  def batches(self, index_blocks):
    """Yields (images, embeddings, indices) for each (K, B) block of split indices."""
    if self.data.mode == 'resident':
      for idx in index_blocks:
        yield self.data.images, self.data.embeddings, self._indices(idx)
      return
    q = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce():
      try:
        for idx in index_blocks:
          if stop.is_set():
            return
          q.put(self._stream(idx))
        q.put(None)
      except BaseException as e:  # surface reader errors in the consumer
        q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
