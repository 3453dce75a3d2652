"""The streaming path's hand-over with grain's worker processes: shared memory and signals."""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from colorflax import signals, streaming

shared_memory_array = pytest.importorskip('grain._src.python.ipc.shared_memory_array')


def test_a_consumed_batch_frees_its_shared_memory_at_once_and_its_data_stays_readable():
  # As a worker sends it and the training process receives it (grain's process_prefetch).
  sent = shared_memory_array.SharedMemoryArray((4, 3), np.uint8)
  sent[:] = np.arange(12, dtype=np.uint8).reshape(4, 3)
  received = shared_memory_array.SharedMemoryArray.from_metadata(sent.metadata)
  received.unlink_on_del()
  name = received.shm.name
  del sent
  assert os.path.exists(f'/dev/shm/{name}')

  streaming._unlink_shared_memory({'images': received, 'step': np.int64(3)})

  assert not os.path.exists(f'/dev/shm/{name}')
  np.testing.assert_array_equal(received, np.arange(12).reshape(4, 3))
  del received  # only closes now: a second unlink would raise FileNotFoundError here


def _report(queue, init=None):
  if init:
    init(0, 1)
  blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
  queue.put(
      (sorted(int(s) for s in blocked), [signal.getsignal(s) for s in streaming._STOP_SIGNALS])
  )


def _child_state(init=None):
  ctx = multiprocessing.get_context('spawn')  # grain's
  queue = ctx.Queue()
  process = ctx.Process(target=_report, args=(queue, init))
  process.start()
  state = queue.get(timeout=60)
  process.join(60)
  return state


def test_grain_workers_start_with_the_stop_signals_blocked_until_they_ignore_them():
  # A closed terminal's SIGHUP reached a worker before its init function ignored it: it died,
  # and training raised. Now it waits, blocked, and the init function discards it.
  signals.start_resource_tracker_without_sighup()
  stop = sorted(int(s) for s in streaming._STOP_SIGNALS)
  before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
  with streaming._workers_start_deaf():
    blocked, _ = _child_state()
    assert set(stop) <= set(blocked)
    blocked, handlers = _child_state(streaming._leave_stop_signals_to_training)
    assert not set(stop) & set(blocked)
    assert handlers == [signal.SIG_IGN] * len(stop)
  assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # this thread hears them again


def _worker(init):
  init(0, 1)
  time.sleep(600)


def _trainer(queue, init):
  """The training process's part: starts a worker as grain does, says its id, waits."""
  worker = multiprocessing.get_context('spawn').Process(target=_worker, args=(init,))
  worker.start()
  queue.put(worker.pid)
  time.sleep(600)


def test_a_grain_worker_ends_when_the_training_process_is_killed_outright(still_running):
  # kill -9 or the OOM killer: training cannot stop its workers. Each waited for ever on its
  # queue, holding its memory (about 200 MB).
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  trainer = ctx.Process(target=_trainer, args=(queue, streaming._leave_stop_signals_to_training))
  trainer.start()
  worker = queue.get(timeout=120)
  trainer.kill()
  trainer.join(60)
  assert not still_running([worker])
