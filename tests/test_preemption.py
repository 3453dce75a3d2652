"""colorflax.preemption in-process: what the training subprocess tests cannot aim at."""

import io
import os
import signal
import sys

from colorflax import preemption, signals


def test_a_signal_in_the_middle_of_a_write_to_stderr_still_stops(monkeypatch):
  # The handler prints its line to stderr. Arriving while stderr's buffer is flushing (a progress
  # line), that print is a reentrant call, which Python refuses with RuntimeError: raised from
  # the handler, it would end training at once, without the checkpoint.
  sent = []

  class Terminal(io.RawIOBase):

    def writable(self):
      return True

    def write(self, data):
      if not sent:
        sent.append(data)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: inside this flush
      return len(data)

  monkeypatch.setattr(
      sys, 'stderr', io.TextIOWrapper(io.BufferedWriter(Terminal()), line_buffering=True)
  )
  before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: a command run in this process
  stop = preemption.StopRequest(checkpoint_manager=None)  # earlier leaves its handler past its end
  try:
    print('train: 2/200 step', file=sys.stderr)
    assert sent and stop.requested() and stop.exit_code == 128 + signal.SIGTERM
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGTERM) is before and not signals.output_is_guarded()
