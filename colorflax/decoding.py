"""Decoding a source's images in worker processes, in source order.

Decoding and resizing (Pillow) run in a pool of processes while the main process batches the
results through Inception. The source (with its list of ids) goes to each worker once.
"""

import collections
import concurrent.futures
import contextlib
import multiprocessing
import signal

from colorflax import signals, sources


@contextlib.contextmanager
def pool(workers, settings):
  """The decode worker processes. concurrent.futures rather than multiprocessing.Pool: when a
  worker dies (SLURM's SIGTERM reaches every process of the job), Pool's terminate waits for
  ever on the queue lock the dead worker held; this pool is just broken. On the way out the
  queued tasks are dropped and the running ones finish."""
  ctx = multiprocessing.get_context('spawn')  # no fork after torch has started its threads
  signals.start_resource_tracker_without_sighup()
  executor = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_init_worker, initargs=settings
  )
  try:
    yield executor
  finally:
    executor.shutdown(wait=True, cancel_futures=True)


def decoded(pool, begin, end, workers):
  """(index, uint8 image or None, skip reason or None) for source rows [begin, end), in order.

  Tasks are index ranges; at most 4 per worker are outstanding: Inception is the slower side,
  and an unbounded queue of decoded images would grow with the dataset.
  """
  chunk, outstanding = 16, collections.deque()
  for lo in range(begin, end, chunk):
    outstanding.append(pool.submit(_prepare_range, lo, min(lo + chunk, end)))
    if len(outstanding) >= 4 * workers:
      yield from outstanding.popleft().result()
  while outstanding:
    yield from outstanding.popleft().result()


_WORKER_SETTINGS = None


def _init_worker(*settings):
  global _WORKER_SETTINGS
  _WORKER_SETTINGS = settings
  # A terminal's Ctrl-C and hang-up reach the decode workers too: the main process stops them
  # (the pool's shutdown), so each need not die with a traceback of its own.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGHUP, signal.SIG_IGN)
  signals.exit_with_parent()  # and if the main process is killed outright, they end too


def _prepare_range(begin, end):
  """The unit of work of a decode worker: sources.prepare_item for rows [begin, end)."""
  source, *rest = _WORKER_SETTINGS
  return [sources.prepare_item(source, i, *rest) for i in range(begin, end)]
