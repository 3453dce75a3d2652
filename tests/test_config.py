import os
import re
import signal
import subprocess
import sys

import pytest

from colorflax import cli, config_validation
from colorflax.errors import ConfigError, UserError
from configs import default, quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_is_the_seed_recipe():
  c = default.get_config()
  assert (c.data.image_size, c.batch_size, c.num_epochs, c.learning_rate) == (256, 8, 60, 1e-3)
  assert (c.plateau.patience, c.plateau.factor, c.data.val_fraction) == (10, 0.1, 0.25)
  assert (c.augment.rotation_degrees, c.augment.shear, c.augment.flip_probability) == (
      20.0,
      0.2,
      0.5,
  )
  assert (c.model.width, c.model.dtype, c.features.kind) == (1.0, 'float32', 'logits')
  config_validation.validate(c)
  config_validation.validate(quickstart.get_config())


@pytest.mark.parametrize(
    'key,value,fragment',
    [
        ('batch_size', -8, 'positive integer'),
        ('data.image_size', 250, 'multiple of 8'),
        ('data.val_fraction', 1.0, 'strictly between 0 and 1'),
        ('data.resize', 'stretch', 'squash'),
        ('features.kind', 'pooled', 'logits'),
        ('model.dtype', 'float16', 'bfloat16'),
        ('features.inception_weights', '/nope/inception.pth', 'no such weights file'),
        ('plateau.factor', 1.5, 'in (0, 1)'),
        ('init_checkpoint', 'newest', "'best', 'latest' or a step number"),
    ],
)
def test_invalid_values_name_the_key(key, value, fragment):
  c = default.get_config()
  section, _, name = key.rpartition('.')
  (c[section] if section else c)[name] = value
  with pytest.raises(ConfigError) as info:
    config_validation.validate(c)
  assert info.value.key == key
  assert fragment in str(info.value)


_PROGRAM = """
from colorflax import cli
cli.run(lambda argv, flags: print(cli.load_config(flags).data.image_size), cli.define_config)
"""


def _cli(*args):
  # A minimal entry point built the way every colorflax entry point is (cli.run + --config).
  return subprocess.run(
      [sys.executable, '-c', _PROGRAM, *args], cwd=REPO, capture_output=True, text=True
  )


def test_cli_overrides_apply():
  r = _cli('--config', 'configs/quickstart.py', '--config.data.image_size=128')
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == '128'


@pytest.mark.parametrize(
    'args,fragment',
    [
        (['--config.data.imagesize=64'], 'config.data.imagesize'),
        (['--config.data.image_size=abc'], 'config.data.image_size'),
        (['--config.data.image_size=60'], 'config.data.image_size'),
        (['--config.batch_size=-1'], 'config.batch_size'),
    ],
)
def test_cli_config_errors_are_one_line_exit_2(args, fragment):
  r = _cli('--config', 'configs/quickstart.py', *args)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert fragment in lines[0]


def test_cli_missing_config_file():
  r = _cli('--config', 'configs/nope.py')
  assert r.returncode == 2
  assert len(r.stderr.strip().splitlines()) == 1 and 'nope.py' in r.stderr


ENTRY_POINTS = [
    'train',
    'evaluate',
    'colorize',
    'precompute_features',
    'benchmark',
    'convert_torch',
    'export',
    'demo',
]


@pytest.mark.parametrize('module', ENTRY_POINTS)
def test_help_lists_the_entry_points_flags(module):
  with open(os.path.join(REPO, 'colorflax', f'{module}.py')) as f:
    source = f.read()
  flags = re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source)
  flags += ['config'] if 'cli.define_config(' in source else []
  if 'cli.define_workdir(' in source:  # --config, --workdir, --checkpoint, and --size if asked
    flags += ['config', 'workdir', 'checkpoint']
    flags += ['size'] if re.search(r'cli\.define_workdir\(\s*flags,\s*size_help=', source) else []
  flags += ['temperature'] if 'cli.define_temperature(' in source else []
  assert flags, f'{module} defines no flags?'
  as_module = [sys.executable, '-m', f'colorflax.{module}']
  as_console_script = [
      sys.executable,
      '-c',
      f'from colorflax.{module} import entry_point; entry_point()',
  ]
  for command in (
      as_module,
      as_console_script,
  ):  # colorflax-train etc. import the module, then run it
    r = subprocess.run(command + ['--help'], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f'`python -m colorflax.{module}')  # its docstring comes first
    listed = re.findall(r'^  --(\w+):', r.stdout, re.MULTILINE)
    assert sorted(listed) == sorted(flags)
    if (
        'for_workdir=True' in source or 'cli.define_workdir(' in source
    ):  # reads DIR/config.json: its --config file is never read
      config_line = re.search(r'^  --config: .*$', r.stdout, re.MULTILINE).group(0)
      assert 'config.json' in config_line and 'default.py' not in config_line, config_line


@pytest.mark.parametrize(
    'module,arg',
    [
        ('evaluate', '--samples=-3'),
        ('colorize', '--size=-8'),
        ('benchmark', '--rounds=0'),
        ('benchmark', '--repeats=0'),
    ],
)
def test_out_of_range_integer_flags_are_one_line_exit_2(module, arg):
  r = subprocess.run(
      [sys.executable, '-m', f'colorflax.{module}', arg], cwd=REPO, capture_output=True, text=True
  )
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{module}.py: error: flag {arg}'), r.stderr


_UNRAISABLE = """
import sys
from colorflax import cli
from colorflax.errors import UserError

class Dying:
  def __del__(self):
    raise RuntimeError('background failure')

def main(argv, flags):
  Dying()  # raises where no caller can catch it: an "unraisable" exception
  if argv[1:] == ['fail']:
    raise UserError('the one line')

cli.run(main, lambda flags: None)
"""


@pytest.mark.parametrize('fails', [False, True])
def test_unraisable_exceptions_are_shown_unless_a_one_line_error_ends_the_run(fails):
  r = subprocess.run(
      [sys.executable, '-c', _UNRAISABLE] + (['fail'] if fails else []),
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  if fails:
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ['-c: error: the one line']
  else:
    assert r.returncode == 0 and 'RuntimeError: background failure' in r.stderr


_SIGNALLED = """
import os, signal, sys, time
from colorflax import cli

def main(argv, flags):
  sig = getattr(signal, argv[1])
  try:
    os.kill(os.getpid(), sig)
    time.sleep(30)
  finally:
    print('cleanup ran', flush=True)
    if argv[2:] == ['again']:  # a cleanup that hangs: the second signal is not held back
      os.kill(os.getpid(), sig)
      time.sleep(30)

if sys.argv[2:] == ['ignored']:  # as under nohup
  signal.signal(signal.SIGHUP, signal.SIG_IGN)
  main = lambda argv, flags: os.kill(os.getpid(), signal.SIGHUP) or time.sleep(0.5)
cli.run(main, lambda flags: None)
"""


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGHUP], ids=['SIGTERM', 'SIGHUP'])
def test_a_scheduler_or_a_closed_terminal_stops_any_entry_point_like_ctrl_c(sig):
  # SIGTERM and SIGHUP raise where the work is, so its cleanup runs (a partial cache is kept,
  # a cut-off output removed), and the run ends with one line and the signal's exit code.
  r = subprocess.run(
      [sys.executable, '-c', _SIGNALLED, sig.name],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert r.returncode == 128 + sig and r.stdout == 'cleanup ran\n', r.stderr
  assert r.stderr.strip().splitlines() == [f'-c: error: stopped by {sig.name}'], r.stderr
  again = subprocess.run(
      [sys.executable, '-c', _SIGNALLED, sig.name, 'again'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert again.returncode == -sig and again.stdout == 'cleanup ran\n', again.stderr


_STOPPED_IN_A_FINALIZER = """
import gc, os, signal, time
from colorflax import cli

class Finalized:
  def __del__(self):  # SIGTERM lands here, where Python cannot raise: it used to be dropped
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)

def main(argv, flags):
  Finalized()
  gc.collect()
  try:
    time.sleep(30)  # the rest of the work: the stop must still end it
  finally:
    print('cleanup ran', flush=True)

cli.run(main, lambda flags: None)
"""


def test_a_stop_that_lands_in_a_finalizer_still_stops_the_work():
  r = subprocess.run(
      [sys.executable, '-c', _STOPPED_IN_A_FINALIZER],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert r.returncode == 143 and r.stdout == 'cleanup ran\n', r.stderr
  assert r.stderr.strip().splitlines()[-1] == '-c: error: stopped by SIGTERM', r.stderr


def test_sighup_ignored_by_nohup_stays_ignored():
  r = subprocess.run(
      [sys.executable, '-c', _SIGNALLED, 'SIGHUP', 'ignored'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert r.returncode == 0 and r.stderr == '', r.stderr


_PRINTS_THEN_WRITES = """
import sys
from colorflax import cli

def main(argv, flags):
  for i in range(20000):  # progress lines, long after the reader has gone
    if argv[2] == 'print':
      print(f'line {i}', flush=True)
    else:
      sys.stdout.writelines([f'line {i}', '\\n'])
      sys.stdout.flush()
  print('a warning on stderr', file=sys.stderr, flush=True)
  with open(argv[1], 'w') as f:
    f.write('the result')

cli.run(main, lambda flags: None)
"""


@pytest.mark.parametrize('write', ['print', 'writelines'])
def test_output_that_can_no_longer_be_written_does_not_stop_the_work(tmp_path, write):
  # `python -m colorflax.evaluate ... | head`, or ssh's pipe gone with the connection: the
  # output is dropped (stdout and stderr both went to that pipe) and the result is still written.
  result = tmp_path / 'result.txt'
  proc = subprocess.Popen(
      [sys.executable, '-c', _PRINTS_THEN_WRITES, str(result), write],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
  )
  proc.stdout.readline()
  proc.stdout.close()  # the reader goes away
  assert proc.wait(timeout=60) == 0
  assert result.read_text() == 'the result'


def test_output_files_are_checked_before_the_work(tmp_path):
  (tmp_path / 'a_file').write_text('keep me')
  for bad, message in (
      (tmp_path, 'is a folder; give a file name'),
      (tmp_path / 'a_file' / 'sub' / 'out.json', f'{tmp_path / "a_file"} is a file, not a folder'),
  ):
    r = subprocess.run(
        [sys.executable, '-m', 'colorflax.benchmark', f'--json={bad}'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f'benchmark.py: error: --json {bad}' + (' ' if message.startswith('is') else ': ') + message
    ]
  for module, args in (
      ('train', ['--config=configs/quickstart.py']),
      ('convert_torch', ['seed.pth']),
  ):
    for workdir, message in (
        (tmp_path / 'a_file', 'is a file; give a folder'),
        (tmp_path / 'a_file' / 'run', f': {tmp_path / "a_file"} is a file, not a folder'),
    ):
      r = subprocess.run(
          [sys.executable, '-m', f'colorflax.{module}', *args, f'--workdir={workdir}'],
          cwd=REPO,
          capture_output=True,
          text=True,
          timeout=120,
      )
      assert r.returncode == 2 and r.stderr.strip().splitlines() == [
          f'{module}.py: error: --workdir {workdir}'
          + (' ' if message.startswith('is') else '')
          + message
      ], r.stderr
  assert (tmp_path / 'a_file').read_text() == 'keep me'
  target = cli.output_file(str(tmp_path / 'new' / 'deeper' / 'm.json'), 'json')
  assert (
      target == str(tmp_path / 'new' / 'deeper' / 'm.json')
      and (tmp_path / 'new' / 'deeper').is_dir()
  )
  assert cli.output_file('', 'json') is None


@pytest.mark.parametrize('name', ['default', 'quickstart', 'photos'])
def test_every_shipped_config_is_valid_and_the_photos_one_is_what_it_says(name):
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config()
  config_validation.validate(config)  # raises ConfigError naming the field
  if name == 'photos':  # the README's "Real photographs" recommendation
    assert (config.loss, config.ema_decay, config.classification.temperature) == (
        'classification',
        0.99,
        0.38,
    )


def test_a_command_that_reads_a_run_says_when_its_workdir_is_missing():
  from absl import flags as absl_flags

  flags = absl_flags.FlagValues()
  cli.define_workdir(flags)
  flags(['colorflax'])
  with pytest.raises(UserError, match='^--workdir is required$'):
    cli.load_workdir_config(flags)
