"""Stopping a training run on request with a checkpoint, so that re-running it loses nothing.

SIGTERM is how schedulers give notice: SLURM at the time limit (or earlier with
`--signal=TERM@SECONDS`), a preempted Cloud TPU or spot VM, `kill`. Python's default is to die
on the spot, losing everything since the last checkpoint (up to an epoch). Instead the training
loop asks `requested()` after every dispatch and, once it says yes, saves a checkpoint and stops.

- One process: SIGTERM and Ctrl-C (SIGINT) set a flag; a second one of either acts as it
  would have without this (SIGTERM kills, Ctrl-C interrupts at once).
- Several processes: their checkpoint is written collectively, so they must all stop after the
  same dispatch, whichever of them got the signal. `jax.distributed` catches SIGTERM itself
  and agrees on that dispatch across processes (its preemption sync point, through orbax's
  `reached_preemption`); Ctrl-C keeps its usual meaning there.
"""

import signal
import sys
import threading

import jax


class StopRequest:
  """Listens from its creation to `close()`. Every process calls `requested()` at the same
  points of the loop (the sync point counts the calls)."""

  def __init__(self, checkpoint_manager):
    self._mngr = checkpoint_manager
    self._calls = 0
    self.signal_name = None
    self._previous = {}
    # With several processes, jax.distributed's preemption notifier owns SIGTERM. Handlers can
    # only be installed from the main thread (training run from another keeps the defaults).
    if not _distributed() and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. Ctrl-C in a background job stays ignored
          self._previous[sig] = signal.signal(sig, self._handle)

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])  # the second one is not held back
    print(f'\n{self.signal_name} received: stopping after this dispatch with a checkpoint '
          f'(send it again to stop at once)', file=sys.stderr, flush=True)

  def requested(self) -> bool:
    """True from the first call after a stop was asked for (sticky)."""
    if self.signal_name is None and _distributed():
      self._calls += 1
      if self._mngr.reached_preemption(self._calls):
        self.signal_name = 'SIGTERM'  # the preemption notice JAX listens for
    return self.signal_name is not None

  @property
  def exit_code(self) -> int:
    return 128 + signal.Signals[self.signal_name].value


def _distributed() -> bool:
  # Several processes. A single process started through jax.distributed counts as one: it has
  # no one to agree with, so its own handler may replace the notifier's.
  return jax.process_count() > 1
