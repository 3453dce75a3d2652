"""Stopping a training run on request with a checkpoint, so that re-running it loses nothing.

SIGTERM is how schedulers give notice: SLURM at the time limit (or earlier with
`--signal=TERM@SECONDS`), a preempted Cloud TPU or spot VM, `kill`. Python's default is to die
on the spot, losing everything since the last checkpoint (up to an epoch). Instead the training
loop asks `requested()` after every dispatch and, once it says yes, saves a checkpoint and stops.

- One process: SIGTERM, Ctrl-C (SIGINT) and SIGHUP set a flag; a second one of any acts as it
  would have without this: training ends at once, without the checkpoint (under `cli.run`,
  every entry point, with its one line: SIGTERM and SIGHUP raise `signals.Stopped` as Ctrl-C
  raises KeyboardInterrupt; a third one kills).
- Several processes: their checkpoint is written collectively, so they must all stop after the
  same dispatch, whichever of them got the signal. `jax.distributed` catches SIGTERM itself
  and agrees on that dispatch across processes (its preemption sync point, through orbax's
  `reached_preemption`); SIGHUP is passed on to it as SIGTERM; Ctrl-C keeps its usual meaning.
- Output that can no longer be written is a stop request too. Training over ssh without tmux:
  when the connection drops, the terminal hangs up (SIGHUP, then EIO on every write), or the pipe
  that carried the output breaks (EPIPE: `gcloud ... ssh --command`, `| tee` killed). Before, the
  next progress line raised BrokenPipeError and the run died without a checkpoint (or killed
  one being written); now the lost stream is pointed at /dev/null and the run stops with one.
"""

import contextlib
import errno
import os
import signal
import sys

import jax

from colorflax import signals


class StopRequest:
  """Listens from its creation to `close()`. Every process calls `requested()` at the same
  points of the loop (the sync point counts the calls)."""

  def __init__(self, checkpoint_manager):
    self._mngr = checkpoint_manager
    self._calls = 0
    self.signal_name = None
    # With several processes, jax.distributed's preemption notifier owns SIGTERM.
    if _distributed():
      handled = {signal.SIGHUP: _to_preemption_notice}
    else:
      handled = dict.fromkeys((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), self._handle)
    self._listening = contextlib.ExitStack()
    self._previous = self._listening.enter_context(signals.signal_handlers(handled))
    self._listening.enter_context(signals.output_guarded(self._output_lost))

  def close(self):
    self._listening.close()

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])  # the second one is not held back
    try:
      print(
          f'\n{self.signal_name} received: stopping after this dispatch with a checkpoint '
          f'(send it again to stop at once)',
          file=sys.stderr,
          flush=True,
      )
    except RuntimeError:  # the signal came in the middle of a write to stderr ("reentrant call")
      pass

  def _output_lost(self, error):
    """A write to stdout or stderr failed for good (signals.output_guarded has sent that stream to
    /dev/null): training stops."""
    if self.signal_name is None:
      if _distributed():
        _to_preemption_notice(signal.SIGHUP, None)
      else:
        self.signal_name = 'SIGPIPE' if error.errno == errno.EPIPE else 'SIGHUP'

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


def _to_preemption_notice(signum, frame):
  """Several processes: SIGHUP (or lost output) becomes the SIGTERM that JAX's preemption
  notifier listens for, so that every process stops after the same dispatch."""
  del signum, frame
  os.kill(os.getpid(), signal.SIGTERM)


def _distributed() -> bool:
  # Several processes. A single process started through jax.distributed counts as one: it has
  # no one to agree with, so its own handler may replace the notifier's.
  return jax.process_count() > 1
