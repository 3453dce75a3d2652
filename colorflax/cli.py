"""What every entry point shares: `--config` with `--config.a.b=value` overrides, validation
before any heavy work, and one-line errors (exit code 2) for bad input instead of tracebacks."""

import os
import re
import sys

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
  `--help` / `-h` print the entry point's `help_text` and exit 0.

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
    code = main(argv)
  except UserError as e:
    one_line_error = True
    import logging
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
    fail(str(e))
  except KeyboardInterrupt:
    one_line_error = True
    fail('interrupted', code=130)
  finally:
    if not one_line_error:  # success, or a crash whose traceback they may help explain
      sys.unraisablehook = default_hook
      for unraisable in held:
        default_hook(unraisable)
  sys.exit(code or 0)
