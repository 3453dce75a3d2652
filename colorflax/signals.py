"""Stopping cleanly when the work is stopped from outside, for every entry point.

Ctrl-C raises KeyboardInterrupt wherever the work is, so its cleanup runs (a partial cache is
kept, a cut-off output removed). SIGTERM (a scheduler's notice, `kill`) and SIGHUP (the
terminal closed) are made to do the same: they raise `Stopped`, a KeyboardInterrupt. Work that
stops says what it kept with `Interrupted`. Output that can no longer be written (a hung-up
terminal, a broken pipe) is dropped instead of raising (`output_guarded`).
"""

import contextlib
import errno
import os
import signal
import sys
import threading


class Stopped(KeyboardInterrupt):
  """SIGTERM or SIGHUP, raised in the main thread wherever the work is, as Ctrl-C raises
  KeyboardInterrupt: the same cleanup runs."""

  def __init__(self, signum):
    self.signal_name = signal.Signals(signum).name
    self.exit_code = 128 + signum
    super().__init__(self.signal_name)


def stop_reason(e: KeyboardInterrupt):
  """('interrupted', 130) for Ctrl-C; ('stopped by SIGTERM', 143) and so on for a `Stopped`."""
  if isinstance(e, Stopped):
    return f'stopped by {e.signal_name}', e.exit_code
  return 'interrupted', 130


class Interrupted(KeyboardInterrupt):
  """Work stopped by Ctrl-C or a signal; the message says what was kept and how to go on, and
  `cli.run` prints it as the one line, with the signal's exit code (128 + its number).

  `cause`: the KeyboardInterrupt (or `Stopped`) that stopped the work; or `signal_name`, for
  work that heard of the signal otherwise (training's stop request)."""

  def __init__(self, message, cause: KeyboardInterrupt = None, signal_name=None):
    if signal_name is not None:
      reason = f'stopped by {signal_name}'
      self.exit_code = 128 + signal.Signals[signal_name].value
    else:
      reason, self.exit_code = stop_reason(cause)
    super().__init__(f'{reason} {message}')


@contextlib.contextmanager
def signal_handlers(handlers):
  """Within: `handlers` ({signal: handler}) in place. Yields the handlers they replaced, which
  come back on the way out. A signal ignored on entry (SIGHUP under nohup, Ctrl-C in a
  background job) stays ignored; handlers can only be set from the main thread (elsewhere this
  does nothing)."""
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig, handler in handlers.items():
      if signal.getsignal(sig) is not signal.SIG_IGN:
        # None: a handler set outside Python.
        previous[sig] = signal.signal(sig, handler) or signal.SIG_DFL
  try:
    yield previous
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


_work = {'done': False}


def work_done():
  """Says that the command's work is complete, its results written: from here a SIGTERM or SIGHUP
  stops nothing (the command is ending anyway, and the signal would land wherever it is, even in
  a finalizer). A second one acts as it would have without colorflax (by default it kills)."""
  _work['done'] = True


@contextlib.contextmanager
def stop_on_signals():
  """Within: SIGTERM and SIGHUP raise `Stopped`, until `work_done()`. A second one acts as it
  would have without this (by default it kills), for cleanup that hangs. Once the work is done
  the handlers stay past the end, so that a signal as the finished command exits is let go."""
  _work['done'] = False

  def handle(signum, frame):
    signal.signal(signum, previous[signum])
    if not _work['done']:
      raise Stopped(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGHUP):
      if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
        previous[sig] = signal.signal(sig, handle) or signal.SIG_DFL
  try:
    yield
  finally:
    if not _work['done']:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def raise_again_soon(stopped: KeyboardInterrupt, delay=0.01):
  """A stop raised where Python cannot raise (a finalizer, a garbage-collector callback: it is
  printed as "Exception ignored" and dropped) is raised again `delay` seconds later, wherever
  the main thread is then; `cli.run` calls this for every stop dropped so."""
  if threading.current_thread() is not threading.main_thread():
    return

  def again(signum, frame):
    signal.signal(signal.SIGALRM, previous)
    raise stopped

  previous = signal.signal(signal.SIGALRM, again) or signal.SIG_DFL
  signal.setitimer(signal.ITIMER_REAL, delay)


def exit_with_parent():
  """Call in a worker process (grain's, precompute's decoders, benchmark's measurement) as it
  starts: it then ends once the process that started it is gone. Killed outright (kill -9, the
  OOM killer), that process cannot stop its workers, and each would wait for ever, holding its
  memory, on a queue whose other end it holds itself."""
  import multiprocessing

  parent = multiprocessing.parent_process()  # from the start: even if it is already gone
  if parent is None:  # not started by multiprocessing
    return

  def watch():
    parent.join()  # its sentinel, a pipe that closes as it exits
    os._exit(1)

  threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def start_resource_tracker_without_sighup():
  """Call before starting worker processes (grain's, precompute's). Their shared memory and
  semaphores are registered with multiprocessing's resource tracker, a process of the same
  group. Python keeps SIGINT and SIGTERM from it, not SIGHUP: on a closed terminal it died, and
  the one started in its place printed a traceback for every block freed after. Started with
  SIGHUP ignored (a disposition kept across exec), it outlives the hangup too."""
  from multiprocessing import resource_tracker

  if threading.current_thread() is not threading.main_thread():
    return  # signal.signal would refuse; the tracker starts as Python starts it
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    resource_tracker.ensure_running()
  finally:
    signal.signal(signal.SIGHUP, previous or signal.SIG_DFL)


class _GuardedStream:
  """sys.stdout or sys.stderr within `output_guarded`: a write that fails for good calls
  `_output_lost` instead of raising (from print, writelines, tqdm's bar, logging)."""

  def __init__(self, stream):
    self._stream = stream

  def _guard(self, method, *args):
    try:
      return method(*args)
    except OSError as e:
      if e.errno not in (errno.EIO, errno.EPIPE):
        raise
      _output_lost(e, _fileno(self._stream))
      return len(args[0]) if args else None

  def write(self, text):
    return self._guard(self._stream.write, text)

  def writelines(self, lines):
    for line in lines:
      self.write(line)

  def flush(self):
    return self._guard(self._stream.flush)

  def __getattr__(self, name):  # isatty, encoding, fileno, ...
    return getattr(self._stream, name)


_output_lost_listeners = []


def _output_lost(error, fd):
  """A write to file descriptor `fd` failed with EIO or EPIPE: every standard stream on that file
  (a terminal, a pipe) now writes to /dev/null, also for Python's flush at exit, which would
  otherwise turn the exit code into 120; then the listeners hear of it."""
  target = _file_id(fd)
  lost = [n for n in (1, 2) if target is not None and _file_id(n) == target]
  null = os.open(os.devnull, os.O_WRONLY)
  for n in lost:
    os.dup2(null, n)
  os.close(null)
  for listener in list(_output_lost_listeners):
    listener(error)


def output_is_guarded() -> bool:
  """Whether stdout and stderr are guarded now (inside `output_guarded`)."""
  return isinstance(sys.stdout, _GuardedStream) and isinstance(sys.stderr, _GuardedStream)


@contextlib.contextmanager
def output_guarded(on_lost=None):
  """Within: output that can no longer be written (the terminal hung up: EIO; the pipe broke:
  EPIPE, as when an ssh connection drops or `| tee` is killed) is dropped instead of raising,
  so the work goes on and its files are written; `on_lost(error)` is called if given. Nests:
  an inner use adds its listener to the streams the outer one guards."""
  wrapped = []
  for name in ('stdout', 'stderr'):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _GuardedStream):
      wrapped.append((name, stream))
      setattr(sys, name, _GuardedStream(stream))
  if on_lost is not None:
    _output_lost_listeners.append(on_lost)
  try:
    yield
  finally:
    if on_lost is not None:
      _output_lost_listeners.remove(on_lost)
    for name, stream in wrapped:
      if isinstance(getattr(sys, name), _GuardedStream):
        setattr(sys, name, stream)


def _fileno(stream):
  try:
    return stream.fileno()
  except (AttributeError, OSError, ValueError):  # pytest's capture, a closed stream
    return None


def _file_id(fd):
  if fd is None:
    return None
  try:
    st = os.fstat(fd)
  except OSError:
    return None
  return st.st_dev, st.st_ino
