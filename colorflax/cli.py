"""What every entry point shares: its flags, `--config` with `--config.a.b=value` overrides,
validation before any heavy work, `--help`, and one-line errors (exit code 2) for bad input
instead of tracebacks; the work runs inside `signals`' clean stop and output guard.

An entry point is a module with a docstring, `define_flags(flags)` and `main(argv, flags)`;
`run(main, define_flags)` builds its flags into a FlagValues of its own (so any number of entry
modules can be imported into one process), parses the command line and calls `main`.
"""

import os
import re
import sys

from absl import flags as absl_flags
from ml_collections import config_flags

from colorflax import config_validation, signals
from colorflax.errors import UserError

EXIT_USAGE = 2

_CONFIG_HELP = 'Path to a config file, e.g. configs/quickstart.py.'
_OVERRIDE_HELP = 'override any field of it with --config.FIELD=VALUE, e.g. --config.batch_size=16'
_WORKDIR_CONFIG_HELP = (
    "Not read: the workdir's recorded config (DIR/config.json) is used; --config.FIELD=VALUE "
    'overrides one of its fields, e.g. --config.data.cache_dir=DIR.'
)


def define_config(flags, default=None, for_workdir=False):
  """`--config FILE` with `--config.a.b=value` overrides. `for_workdir`: the entry point reads a
  workdir's recorded config and takes only the overrides from the command line (the file, by
  default configs/default.py, only gives the overrides their fields)."""
  if for_workdir:
    default = default or default_config_path()
  help_text = _WORKDIR_CONFIG_HELP if for_workdir else _CONFIG_HELP
  config_flags.DEFINE_config_file('config', default, help_text, flag_values=flags, lock_config=True)


WORKING_SIZE_HELP = 'Working resolution (multiple of 8); 0 = the training image size.'


def define_workdir(flags, size_help=None):
  """The flags of a command that uses a trained model: --config (its overrides only), --workdir,
  --checkpoint and, given `size_help`, --size."""
  define_config(flags, for_workdir=True)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string('workdir', None, 'A training (or convert_torch) workdir.', **define)
  absl_flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.", **define)
  if size_help:
    absl_flags.DEFINE_integer('size', 0, size_help, lower_bound=0, **define)


def inception_weights_override(flags, config):
  """--config.features.inception_weights if this command line gives it, else None: the
  weights the run's features cache recorded are used."""
  overridden = 'features.inception_weights' in override_values(flags)
  return config.features.inception_weights if overridden else None


def define_temperature(flags):
  """--temperature, of evaluate and colorize (losses.objective checks the run has one)."""
  absl_flags.DEFINE_float(
      'temperature',
      None,
      "A classification model's temperature: its colours' annealed mean, from vivid (small, "
      "towards the most likely bin) to safe (1, the mean); default: the config's.",
      lower_bound=0.01,
      flag_values=flags,
  )


def _error_line(message):
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'colorflax'
  print(f'{prog}: error: {message}', file=sys.stderr)


def fail(message: str, code: int = EXIT_USAGE):
  _error_line(message)
  sys.exit(code)


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


def _config_path(argv):
  """The config file this command line names (--config FILE or --config=FILE), else the
  default a workdir entry point parses its overrides with."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg[len('--config=') :]
  return default_config_path()


def config_file_problem(path):
  """Why `path` is not a config file colorflax can use (one line), or None."""
  import importlib.util

  import ml_collections

  if not os.path.isfile(os.path.expanduser(path)):
    return f'--config: no such file: {path}'
  try:
    spec = importlib.util.spec_from_file_location(
        'colorflax_config_check', os.path.expanduser(path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except (SyntaxError, ValueError) as e:
    if 'null bytes' in str(e):  # a binary file (SyntaxError or ValueError, by Python release)
      return f'--config {path} is not a Python file (it holds null bytes)'
    if isinstance(e, SyntaxError):
      return f'--config {path} is not valid Python ({e.msg}, line {e.lineno})'
    return f'--config {path} failed to load ({e})'
  except Exception as e:
    return f'--config {path} failed to load ({type(e).__name__}: {_first_line(e)})'
  if not callable(getattr(module, 'get_config', None)):
    return f'--config {path} defines no get_config() (see configs/default.py)'
  try:
    config = module.get_config()
  except Exception as e:
    return f'--config {path}: get_config() failed ({type(e).__name__}: {_first_line(e)})'
  if not isinstance(config, ml_collections.ConfigDict):
    return (
        f'--config {path}: get_config() returned a {type(config).__name__}, not an '
        'ml_collections.ConfigDict'
    )
  return None


def _first_line(e):
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def parse_command_line(define_flags, argv):
  """(the entry point's flags, the arguments left): the flags built and parsed, with every
  problem of the config (a typo in an override, a file that is not a config) one clear line."""
  try:
    flags = build_flags(define_flags)  # a workdir entry point's default config loads here
    if any(arg in ('--help', '-h', '-help', '--helpfull') for arg in argv[1:]):
      return flags, None
    return flags, flags(argv)
  except absl_flags.Error as e:
    fail(str(e).splitlines()[0])
  except Exception as e:  # the config file, or an override of a field it does not have
    problem = config_file_problem(_config_path(argv[1:]))
    if problem is None and isinstance(e, (AttributeError, KeyError)):
      problem = _unknown_key_message(e, argv)
    fail(problem or f'--config: {type(e).__name__}: {_first_line(e)}')


def load_config(flags):
  """The parsed, overridden, locked config, validated; a missing or broken file is one line."""
  import ml_collections

  path = flags['config'].config_filename
  if not path:
    raise UserError('--config is required, e.g. --config configs/quickstart.py')
  try:
    config = flags.config
    config.keys()  # the file is loaded lazily; make a loading error surface here
  except Exception:
    raise UserError(config_file_problem(path) or f'--config {path} cannot be loaded') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(config_file_problem(path) or f'--config {path} is not a config')
  return config_validation.validate(config)


def _file_on_the_way(folder, flag, given):
  """A folder to be written into: refuse it now if it, or a folder above it, is a file."""
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = (
        ' is a file; give a folder'
        if existing == given
        else f': {existing} is a file, not a folder'
    )
    raise UserError(f'--{flag} {given}{where}')


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


def override_values(flags) -> dict:
  """{'a.b': value} for each --config.a.b=value given on this command line."""
  return config_flags.get_override_values(flags['config'])


def load_workdir_config(flags):
  """--workdir's recorded config (define_workdir's flags), with this command line's
  --config.x=... overrides applied."""
  from colorflax import checkpoints

  workdir = flags.workdir
  if not workdir:
    raise UserError('--workdir is required')
  if flags['config'].present:  # only its fields are used, but a wrong file is still a mistake
    if problem := config_file_problem(flags['config'].config_filename):
      raise UserError(problem)
  config = checkpoints.read_config(workdir)
  for key, value in override_values(flags).items():
    if key in checkpoints.INIT_FROM_KEYS + ('loss',) and value != checkpoints.field(config, key):
      raise UserError(
          f'--config.{key}={value}: {workdir} was trained with {key}='
          f'{checkpoints.field(config, key)!r}, which its weights are for'
      )
    parent, _, name = key.rpartition('.')
    (config_validation.get_field(config, parent) if parent else config)[name] = value
  return config_validation.validate(config)


def help_text(doc, flags) -> str:
  """The entry point's docstring and its flags, in the order defined: what `--help` prints."""
  doc = (doc or '').strip()
  lines = [doc, '', 'flags:'] if doc else ['flags:']
  for name in flags:
    flag = flags[name]
    if flag.help == _WORKDIR_CONFIG_HELP:  # its default path is never read
      lines.append(f'  --{name}: {flag.help}')
      continue
    default = (flag.default_as_str or '').strip("'")  # the config flag's default is its path
    shown = default if default not in ('', 'None') else 'none'
    lines.append(f'  --{name}: {flag.help} [default: {shown}]')
    if name == 'config':
      lines.append(f'      {_OVERRIDE_HELP}')
  return '\n'.join(lines)


def build_flags(define_flags):
  """A FlagValues of the entry point's own, with its flags defined (and nothing else)."""
  flags = absl_flags.FlagValues()
  define_flags(flags)
  return flags


def _stopped(message, code):
  """Ends a command that a signal stopped, once its cleanup has run: the one line, then exit at
  once. Not through the interpreter's own shutdown, which crashed (SIGSEGV) when the signal had
  come while XLA was starting or compiling in its threads."""
  _error_line(message)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)


def run(main, define_flags):
  """Builds the flags, parses the command line and calls `main(argv, flags)`; UserError -> one
  line on stderr and exit code 2. `--help` / `-h` print the entry point's `help_text` and exit 0.
  Ctrl-C, SIGTERM and SIGHUP stop the work with one line (`Interrupted`'s, if the work raised
  one) and exit code 128 + the signal; once `main` has returned, the work is done and a signal
  no longer stops it (a second one kills). Output that can no longer be written is dropped
  (`signals.output_guarded`).

  Exceptions raised where no one can catch them (callbacks of background threads: Python calls
  them "unraisable") are held back until the end. After a one-line error they are dropped: they
  are the same failure seen again by the other tasks of a failed operation (e.g. orbax's other
  reads of a damaged checkpoint), a screenful of tracebacks that would bury the one line.
  """
  flags, argv = parse_command_line(define_flags, sys.argv)
  if argv is None:
    print(help_text(sys.modules[main.__module__].__doc__, flags))
    sys.exit(0)
  default_hook, held, one_line_error = sys.unraisablehook, [], False
  code, finished = None, False

  def hold(unraisable):
    held.append(unraisable)
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and not finished:
      signals.raise_again_soon(unraisable.exc_value)  # a stop dropped in a finalizer

  sys.unraisablehook = hold
  try:
    with signals.stop_on_signals(), signals.output_guarded():
      code = main(argv, flags)
      finished = True
      signals.work_done()
  except UserError as e:
    one_line_error = True
    import logging

    logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
    fail(str(e))
  except signals.Interrupted as e:
    one_line_error = True
    _stopped(str(e), e.exit_code)
  except KeyboardInterrupt as e:
    if not finished:  # else Ctrl-C came as the finished command was ending: nothing to stop
      one_line_error = True
      _stopped(*signals.stop_reason(e))
  finally:
    if not one_line_error:  # success, or a crash whose traceback they may help explain
      sys.unraisablehook = default_hook
      for unraisable in held:
        default_hook(unraisable)
  sys.exit(code or 0)
