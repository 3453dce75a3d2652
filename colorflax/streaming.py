"""Streaming the features cache from disk with grain, for datasets larger than device memory.

  global step s -> this process's rows of step s's batch (the resident path's epoch order)
                -> read from the memory-mapped cache by grain (threads, or worker processes)
                -> K steps stacked and assembled into global jax.Arrays in a background thread

Each process reads only its own slice of every global batch (the batch positions its devices
hold) and hands it to `jax.make_array_from_process_local_data`. The rows and their order are
those of the resident path, and augmentation and Lab conversion happen in the same jitted step,
so streaming and resident runs train identically.

The grain iterator's state after the last dispatch the step consumed is saved in every
checkpoint (one file per process, grain's orbax handler), so a resumed run continues with
exactly the batches the interrupted one would have seen.
"""

import contextlib
import functools
import gc
import json
import os
import queue
import signal
import threading

import grain
from absl import flags
import jax
import numpy as np

from colorflax import distributed, signals
from colorflax.device_pipeline import epoch_order
from colorflax.errors import UserError


class CacheRows:
  """Random access to the features cache's rows (`read`), memory-mapped lazily in each process
  that reads (so it pickles to grain's worker processes as two paths)."""

  def __init__(self, cache_dir):
    self.paths = (os.path.join(cache_dir, 'images.npy'), os.path.join(cache_dir, 'embeddings.npy'))
    self._arrays = None

  def __getstate__(self):
    return {'paths': self.paths, '_arrays': None}

  @property
  def arrays(self):
    if self._arrays is None:
      self._arrays = tuple(np.load(p, mmap_mode='r') for p in self.paths)
    return self._arrays

  def read(self, rows):
    """(images, embeddings) of `rows`, in that order; the files are read in ascending order."""
    images, embeddings = self.arrays
    order = np.argsort(rows, kind='stable')
    out_images = np.empty((len(rows), *images.shape[1:]), images.dtype)
    out_images[order] = images[rows[order]]
    out_embeddings = np.empty((len(rows), *embeddings.shape[1:]), np.float32)
    out_embeddings[order] = embeddings[rows[order]]
    return out_images, out_embeddings


class TrainBatch:
  """grain map: global step -> {'step', 'images', 'embeddings'} of this process's batch slice."""

  def __init__(self, cache_dir, split_rows, seed, steps_per_epoch, batch, positions):
    self.source = CacheRows(cache_dir)
    self.split_rows, self.seed = np.asarray(split_rows), seed
    self.steps_per_epoch, self.batch, self.positions = steps_per_epoch, batch, np.asarray(positions)

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch):
    return epoch_order(len(self.split_rows), self.seed, epoch)

  def __call__(self, step):
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    idx = self._order(epoch)[pos * self.batch + self.positions]
    images, embeddings = self.source.read(self.split_rows[idx])
    return {'step': np.int64(step), 'images': images, 'embeddings': embeddings}


class EvalBatch:
  """grain map: batch number -> this process's slice of that validation batch (split order,
  the last batch padded with row 0; the caller masks the padding)."""

  def __init__(self, cache_dir, split_rows, batch, positions):
    self.source = CacheRows(cache_dir)
    self.split_rows, self.batch, self.positions = (
        np.asarray(split_rows),
        batch,
        np.asarray(positions),
    )

  def __call__(self, j):
    idx = j * self.batch + self.positions
    idx = np.where(idx < len(self.split_rows), idx, 0)
    images, embeddings = self.source.read(self.split_rows[idx])
    return {'images': images, 'embeddings': embeddings}


def process_positions(sharding, global_batch):
  """The positions of a global batch that this process's devices hold under `sharding`
  (sharding the batch axis, axis 0 of a (B,) array), in ascending order."""
  spans = sharding.addressable_devices_indices_map((global_batch,)).values()
  return np.unique(np.concatenate([np.arange(global_batch)[s[0]] for s in spans]))


def _read_options(config):
  return grain.ReadOptions(
      num_threads=config.data.stream_threads, prefetch_buffer_size=config.data.stream_prefetch
  )


class IteratorState:
  """What a checkpoint stores about the stream, in the shape grain's orbax handler saves and
  restores (`get_state` -> bytes, `set_state(bytes)`): the step the run's dataset starts at and
  the grain iterator's state after the last dispatch the training step received."""

  def __init__(self, first_step=0, iterator_state=None):
    self.first_step, self.iterator_state = first_step, iterator_state

  def get_state(self) -> bytes:
    return json.dumps({'first_step': self.first_step, 'iterator': self.iterator_state}).encode()

  def set_state(self, state: bytes):
    d = json.loads(state)
    self.first_step, self.iterator_state = d['first_step'], d['iterator']

  def start_prefetch(self):  # the handler calls this after restoring; the stream starts later
    pass


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _leave_stop_signals_to_training(worker_index, worker_count):
  """Ctrl-C, schedulers' SIGTERM and a closed terminal's SIGHUP (the shell sends it to its jobs)
  reach the whole process group. Training stops on them with a checkpoint (colorflax.preemption)
  and then stops its workers itself (grain: an event, then a kill); a worker that died on the
  signal first would print a traceback and could leave it short of the batches it still reads.

  Workers start with these signals blocked (`_workers_start_deaf`), so one that arrives while a
  worker starts waits; ignoring it here discards it, and only then are they unblocked."""
  del worker_index, worker_count
  for signum in _STOP_SIGNALS:
    signal.signal(signum, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
  signals.exit_with_parent()  # and if training is killed outright (kill -9), they end too


@contextlib.contextmanager
def _workers_start_deaf():
  """Within: worker processes started by this thread (grain starts them on first use, from
  threads this one starts too) inherit the stop signals blocked, until their
  `_leave_stop_signals_to_training`; otherwise a signal in their first second of start-up, before
  it, killed them. The process still gets the signal: the kernel hands it to a thread that does
  not block it, and Python runs its handlers in the main thread in any case. The resource
  tracker must already run (signals.start_resource_tracker_without_sighup): starting it
  unblocks SIGINT and SIGTERM in the calling thread."""
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StreamFeeder:
  """The batches of a run, streamed; the same interface as `device_pipeline.ResidentFeeder`.

  `train_dispatches(first_step, sizes)` yields (None, (images (K, B, S, S, 3), embeddings
  (K, B, D))) for consecutive dispatches; after each, `checkpoint_state()` is the stream state
  to save with the training state it produced.
  """

  def __init__(
      self,
      cache_dir,
      train_rows,
      val_rows,
      mesh,
      config,
      batch,
      steps_per_epoch,
      eval_batch,
      total_steps,
      start_step,
      restored: IteratorState | None = None,
  ):
    self.cache_dir, self.val_rows, self.config, self.eval_batch = (
        cache_dir,
        val_rows,
        config,
        eval_batch,
    )
    self.batch = batch
    self.dispatch_sharding = distributed.dispatch_sharding(mesh)
    self.batch_sharding = distributed.batch_sharding(mesh)
    positions = process_positions(self.batch_sharding, batch)
    if restored is None or restored.iterator_state is None:
      restored = IteratorState(
          first_step=start_step
      )  # a fresh run, or a checkpoint without stream state
    self.state = restored
    ds = grain.MapDataset.range(restored.first_step, max(total_steps, restored.first_step))
    ds = ds.map(TrainBatch(cache_dir, train_rows, config.seed, steps_per_epoch, batch, positions))
    it_ds = ds.to_iter_dataset(_read_options(config))
    if config.data.stream_workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; called outside app.run
        flags.FLAGS.mark_as_parsed()
      signals.start_resource_tracker_without_sighup()
      it_ds = it_ds.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=config.data.stream_workers,
              per_worker_buffer_size=config.data.stream_prefetch,
          ),
          worker_init_fn=_leave_stop_signals_to_training,
      )
    with _workers_start_deaf():
      self.iterator = iter(it_ds)
      if restored.iterator_state is not None:
        self.iterator.set_state(restored.iterator_state)
    self.prefetch = 2  # dispatches assembled ahead of the one running

  @staticmethod
  def _global(local, sharding, batch_axis, global_batch):
    """The global array whose slice on this process's devices is `local`."""
    shape = list(local.shape)
    shape[batch_axis] = global_batch
    return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

  def _assemble(self, elements, expected_first):
    steps = [int(e['step']) for e in elements]
    if steps != list(range(expected_first, expected_first + len(elements))):
      raise UserError(
          f'the data stream delivered steps {steps[0]}..{steps[-1]} where the training state '
          f"expects {expected_first}..{expected_first + len(elements) - 1}: the checkpoint's "
          f'stream state does not belong to its step'
      )
    return tuple(
        self._global(np.stack([e[key] for e in elements]), self.dispatch_sharding, 1, self.batch)
        for key in ('images', 'embeddings')
    )

  def train_dispatches(self, first_step, sizes):
    q = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce():
      # This thread never handles signals (the main thread does), and grain starts its workers
      # from it on the first `next`.
      signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
      try:
        step = first_step
        for n in sizes:
          if stop.is_set():
            return
          elements = [next(self.iterator) for _ in range(n)]
          arrays = self._assemble(elements, step)
          for element in elements:
            _unlink_shared_memory(element)
          q.put((arrays, IteratorState(self.state.first_step, self.iterator.get_state())))
          step += n
        q.put(None)
      except BaseException as e:  # surface reader errors in the training loop
        q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name='colorflax-stream')
    thread.start()
    try:
      while True:
        item = q.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        arrays, self.state = item
        yield None, arrays
    finally:
      stop.set()
      while thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
        try:
          q.get(timeout=0.1)
        except queue.Empty:
          pass

  def eval_batches(self):
    """Validation batches in split order; the last is padded with row 0 (mask it)."""
    positions = process_positions(self.batch_sharding, self.eval_batch)
    n = -(-len(self.val_rows) // self.eval_batch)
    ds = grain.MapDataset.range(n).map(
        EvalBatch(self.cache_dir, self.val_rows, self.eval_batch, positions)
    )
    for e in ds.to_iter_dataset(_read_options(self.config)):
      yield None, tuple(
          self._global(e[key], self.batch_sharding, 0, self.eval_batch)
          for key in ('images', 'embeddings')
      )

  def checkpoint_state(self):
    return self.state

  def close(self):
    """Stops grain's workers and frees the batches still in shared memory. grain's prefetch
    thread keeps its last elements in a reference cycle (the StopIteration it stores holds the
    thread's frame), which only the garbage collector frees: at exit Python's resource tracker
    would find them and warn of 'leaked shared_memory objects'."""
    iterator, self.iterator = self.iterator, None
    if hasattr(iterator, 'close'):
      iterator.close()
    del iterator
    gc.collect()
    _wait_for_shared_memory_release()


def _unlink_shared_memory(element):
  """Frees the name of each array of `element` that a grain worker passed in shared memory, once
  its data is copied (`_assemble` stacks it). grain leaves that to the array's last reference,
  whose deletion queues the unlink on a thread (`_wait_for_shared_memory_release`); when grain's
  own threads hold the last element of a run until after training has closed the stream, the
  unlink came too late at exit and Python's resource tracker warned of a leaked shared_memory
  object (seen on a loaded 2-core CI machine). The mapping stays valid until the array is
  deleted, which then only closes it. A grain whose arrays lack these attributes is left as it
  is."""
  for leaf in element.values():
    shm = getattr(leaf, 'shm', None)
    if shm is not None and getattr(leaf, '_unlink_on_del', False):
      leaf._unlink_on_del = False  # pylint: disable=protected-access
      shm.unlink()


def _wait_for_shared_memory_release(timeout=30.0):
  """grain unlinks a consumed batch's shared memory in a pool of one thread
  (SharedMemoryArray.enable_async_del(1)); unlinks still queued at exit are dropped with the
  pool, and the resource tracker warns of 'leaked shared_memory objects' (seen on a loaded
  2-core machine). A no-op queued behind them returns once they have run. grain has no public
  way to wait for them: a grain without this pool is left as it is."""
  try:
    from grain._src.python.ipc import shared_memory_array
  except ImportError:
    return
  pool = getattr(shared_memory_array.SharedMemoryArray, '_del_thread_pool', None)
  if pool is not None:
    pool.apply_async(lambda: None).wait(timeout)
