"""What every entry point shares: `--config` with `--config.a.b=value` overrides, validation
before any heavy work, one-line errors (exit code 2) for bad input instead of tracebacks, and a
clean stop when the work is stopped from outside (Ctrl-C, SIGTERM, SIGHUP, a lost terminal)."""

import contextlib
import errno
import os
import re
import signal
import sys
import threading

from absl import flags
from ml_collections import config_flags

from colorflax import config_validation
from colorflax.errors import UserError

EXIT_USAGE = 2


def _existing(name):
  # Entry-point modules define their flags at import; importing several of them into one
  # process (tests, notebooks) must not fail on the second definition.
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return None


# Flag names per defining module, in definition order: `--help` lists the running entry point's.
_MODULE_FLAGS = {}


def _define(name, define, *args, **kwargs):
  module = sys._getframe(2).f_globals.get('__name__')  # the entry point calling define_*
  names = _MODULE_FLAGS.setdefault(module, [])
  if name not in names:
    names.append(name)
  holder = _existing(name)
  return holder if holder is not None else define(name, *args, **kwargs)


_CONFIG_HELP = 'Path to a config file, e.g. configs/quickstart.py.'
_WORKDIR_CONFIG_HELP = ("Not read: the workdir's recorded config (DIR/config.json) is used; "
                        '--config.FIELD=VALUE overrides one of its fields, e.g. --config.data.cache_dir=DIR.')


_WORKDIR_CONFIG_MODULES = set()  # entry points whose --help shows _WORKDIR_CONFIG_HELP


def define_config_flag(default=None, for_workdir=False):
  """`--config FILE` with `--config.a.b=value` overrides. `for_workdir`: the entry point reads a
  workdir's recorded config and takes only the overrides from the command line."""
  if for_workdir:
    _WORKDIR_CONFIG_MODULES.add(sys._getframe(1).f_globals.get('__name__'))
  return _define('config', config_flags.DEFINE_config_file, default, _CONFIG_HELP, lock_config=True)


def define_string(name, default, help_text):
  return _define(name, flags.DEFINE_string, default, help_text)


def define_bool(name, default, help_text):
  return _define(name, flags.DEFINE_bool, default, help_text)


def define_integer(name, default, help_text, lower_bound=0):
  """An integer flag; a value below `lower_bound` is a one-line error when flags are parsed."""
  return _define(name, flags.DEFINE_integer, default, help_text, lower_bound=lower_bound)


def fail(message: str, code: int = EXIT_USAGE):
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'colorflax'
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(code)


class Stopped(KeyboardInterrupt):
  """SIGTERM (a scheduler's notice, `kill`) or SIGHUP (the terminal closed), raised in the main
  thread wherever the work is, as Ctrl-C raises KeyboardInterrupt: the same cleanup runs."""

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
  """Work stopped by Ctrl-C or a signal (`cause`); the message says what was kept and how to
  go on, and `run` prints it as the one line, with the signal's exit code."""

  def __init__(self, message, cause: KeyboardInterrupt):
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
        previous[sig] = signal.signal(sig, handler) or signal.SIG_DFL  # None: set outside Python
  try:
    yield previous
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


@contextlib.contextmanager
def stop_on_signals():
  """Within: SIGTERM and SIGHUP raise `Stopped`. A second one acts as it would have without this
  (by default it kills), for cleanup that hangs."""

  def handle(signum, frame):
    signal.signal(signum, previous[signum])
    raise Stopped(signum)

  with signal_handlers({signal.SIGTERM: handle, signal.SIGHUP: handle}) as previous:
    yield


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


def _unknown_key_message(exc, argv):
  text = str(exc).replace('\\', '')
  key = re.search(r"'(\w+)'", text)
  key = key.group(1) if key else text
  hint = re.search(r'Did you mean "(\w+)"', text)
  hint = f" (did you mean '{hint.group(1)}'?)" if hint else ''
  for arg in argv:
    m = re.match(r'--(config(?:\.\w+)+)', arg)
    if m and key in m.group(1).split('.'):
      return f'--{m.group(1)}: no such config field{hint}'
  return f'unknown config field {key!r}{hint}'


def parse_flags(argv):
  """absl flag parsing, with config errors reduced to one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    fail(_unknown_key_message(e, argv))


def load_config(holder):
  """The parsed, overridden, locked config, validated; a missing or broken file is one line."""
  if holder.value is None:
    raise UserError('--config is required, e.g. --config configs/quickstart.py')
  try:
    config = holder.value
    config.keys()  # the file is loaded lazily; make a loading error surface here
  except (OSError, SyntaxError, ImportError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raise UserError(f'--config: {lines[-1] if lines else e}') from None
  return config_validation.validate(config)


def _file_on_the_way(folder, flag, given):
  """A folder to be written into: refuse it now if it, or a folder above it, is a file."""
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'--{flag} {given}' + (' is a file; give a folder' if existing == given
                                           else f': {existing} is a file, not a folder'))


def output_folder(path, flag):
  """`path` (absolute) if it can be a folder to write into, else a one-line error; not created."""
  path = os.path.abspath(os.path.expanduser(path))
  _file_on_the_way(path, flag, path)
  return path


def output_file(path, flag):
  """`path` made ready to be written at the end of a long run: its folder created, and a path
  that cannot be a file (a folder, a file as its parent) refused now, not after the work."""
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    raise UserError(f'--{flag} {path} is a folder; give a file name')
  _file_on_the_way(os.path.dirname(path), flag, path)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError as e:
    raise UserError(f'--{flag} {path}: cannot create its folder ({e.strerror or e})') from None
  return path


def default_config_path():
  import configs
  return os.path.join(os.path.dirname(configs.__file__), 'default.py')


def override_values() -> dict:
  """{'a.b': value} for each --config.a.b=value given on this command line."""
  return config_flags.get_override_values(flags.FLAGS['config'])


def load_workdir_config(workdir):
  """A workdir's recorded config, with this command line's --config.x=... overrides applied."""
  from colorflax import checkpoints
  config = checkpoints.read_config(workdir)
  for key, value in override_values().items():
    parent, _, name = key.rpartition('.')
    (config_validation.get_field(config, parent) if parent else config)[name] = value
  return config_validation.validate(config)


def help_text(module='__main__') -> str:
  """The entry point's docstring and its flags: what `--help` prints."""
  doc = (sys.modules[module].__doc__ or '').strip()
  lines = [doc, '', 'flags:'] if doc else ['flags:']
  for name in _MODULE_FLAGS.get(module, []):
    flag = flags.FLAGS[name]
    if name == 'config' and module in _WORKDIR_CONFIG_MODULES:  # its default path is never read
      lines.append(f'  --{name}: {_WORKDIR_CONFIG_HELP}')
      continue
    default = (flag.default_as_str or '').strip("'")  # the config flag's default is its path
    lines.append(f"  --{name}: {flag.help} [default: {default if default not in ('', 'None') else 'none'}]")
    if name == 'config':
      lines.append('      override any field of it with --config.FIELD=VALUE, e.g. --config.batch_size=16')
  return '\n'.join(lines)


def run(main):
  """Parses flags and calls `main(argv)`; UserError -> one line on stderr and exit code 2.
  `--help` / `-h` print the entry point's `help_text` and exit 0. Ctrl-C, SIGTERM and SIGHUP
  stop the work with one line (`Interrupted`'s, if the work raised one) and exit code 128 + the
  signal; output that can no longer be written is dropped (`output_guarded`).

  Exceptions raised where no one can catch them (callbacks of background threads: Python calls
  them "unraisable") are held back until the end. After a one-line error they are dropped: they
  are the same failure seen again by the other tasks of a failed operation (e.g. orbax's other
  reads of a damaged checkpoint), a screenful of tracebacks that would bury the one line.
  """
  if any(arg in ('--help', '-h', '-help', '--helpfull') for arg in sys.argv[1:]):
    print(help_text(main.__module__))  # '__main__' under `python -m`, the module for console scripts
    sys.exit(0)
  argv = parse_flags(sys.argv)
  default_hook, held, one_line_error = sys.unraisablehook, [], False
  sys.unraisablehook = held.append
  try:
    with stop_on_signals(), output_guarded():
      try:
        code = main(argv)
      except UserError as e:
        one_line_error = True
        import logging
        logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
        fail(str(e))
      except Interrupted as e:
        one_line_error = True
        fail(str(e), code=e.exit_code)
      except KeyboardInterrupt as e:
        one_line_error = True
        fail(*stop_reason(e))
  finally:
    if not one_line_error:  # success, or a crash whose traceback they may help explain
      sys.unraisablehook = default_hook
      for unraisable in held:
        default_hook(unraisable)
  sys.exit(code or 0)
