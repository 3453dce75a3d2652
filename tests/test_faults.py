"""Faults at every moment, bad input at every entry point: one line with the documented exit code,
or a correct recovery; nothing lost; and the command run again ends where an uninterrupted run
would.

The matrix: every entry point (ENTRY_POINTS; a new one joins with one line) x every fault
(FAULTS), on a tiny config. Faults of the disk and signals run the real command in its own
process; bad input, refused before any work, runs the same `cli.run` in this one (a Python
start-up is 3 s, most of such a cell's time)."""

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from colorflax import checkpoints, cli, features_cache, precompute_features, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import small_config  # noqa: E402

# The config file of the commands below: test_train's small_config, as a file.
CONFIG = """
from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.data.cache_dir = {cache!r}
  c.data.synthetic_images = 48
  c.data.image_size = 32
  c.features.batch_size = 16
  c.features.num_workers = 1
  c.features.calibration_images = 16
  c.model.width = 0.125
  c.batch_size = 8
  c.steps_per_dispatch = 2
  c.num_epochs = 2
  c.samples_every_epochs = 0
  return c
"""


@dataclasses.dataclass
class Context:
  root: object  # pathlib.Path of the module's files
  config: str  # the config file
  cache: str  # a finished cache of the config
  run: str  # a workdir trained on it (2 epochs)
  image: str  # an image to colorize
  pth: str  # a prototype checkpoint


@pytest.fixture(scope='module')
def ctx(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults')
  cache = root / 'cache'
  precompute_features.precompute(small_config(cache), progress=False)
  train.train_and_evaluate(
      small_config(cache, samples_every_epochs=0), str(root / 'run'), progress=False
  )
  (root / 'config.py').write_text(CONFIG.format(cache=str(cache)))
  Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(root / 'photo.png')
  import torch

  from colorflax.reference import EncDec

  torch.manual_seed(0)
  torch.save(EncDec().state_dict(), root / 'seed.pth')
  return Context(
      root,
      str(root / 'config.py'),
      str(cache),
      str(root / 'run'),
      str(root / 'photo.png'),
      str(root / 'seed.pth'),
  )


@dataclasses.dataclass
class Entry:
  """An entry point: its command line writing into the folder `out`, whether it takes
  --config overrides, the line it prints when done (stdout), and the command whose input is
  missing or garbled (or None)."""

  args: object  # (ctx, out) -> [arguments]
  takes_config: bool
  done: str
  missing_input: object = None  # (ctx, out) -> [arguments]
  runs_long: bool = False  # minutes, not seconds: left out of the cells that run it whole


def _garbled_cache(ctx, out):
  os.makedirs(f'{out}/cache', exist_ok=True)
  with open(f'{out}/cache/manifest.json', 'w') as f:
    f.write('[1, 2]')  # a JSON list, not a manifest (edited by hand)
  return ['--config', ctx.config, f'--config.data.cache_dir={out}/cache']


ENTRY_POINTS = {
    'precompute_features': Entry(
        lambda c, out: ['--config', c.config, f'--config.data.cache_dir={out}/cache'],
        True,
        'cached ',
        _garbled_cache,
    ),
    'train': Entry(
        lambda c, out: ['--config', c.config, f'--workdir={out}/run'],
        True,
        'done: ',
        lambda c, out: [
            '--config',
            c.config,
            f'--config.data.cache_dir={out}/none',
            f'--workdir={out}/run',
        ],
    ),
    'evaluate': Entry(
        lambda c, out: [f'--workdir={c.run}', f'--json={out}/metrics.json'],
        True,
        'PSNR',
        lambda c, out: [f'--workdir={out}/nowhere'],
    ),
    'colorize': Entry(
        lambda c, out: [f'--workdir={c.run}', f'--output={out}/colorized', c.image],
        True,
        'colorized 1 file',
        lambda c, out: [f'--workdir={out}/nowhere', f'--output={out}/o', c.image],
    ),
    'convert_torch': Entry(
        lambda c, out: [c.pth, f'--workdir={out}/imported'],
        False,
        'wrote ',
        lambda c, out: [f'{out}/nowhere.pth', f'--workdir={out}/imported'],
    ),
    'benchmark': Entry(
        lambda c, out: [
            '--config',
            c.config,
            '--notorch',
            '--repeats=1',
            f'--json={out}/bench.json',
        ],
        True,
        'MFU',
        runs_long=True,
    ),
}


def _command(entry, args):
  return [sys.executable, '-m', f'colorflax.{entry}', *args]


def _run(entry, args, timeout=300):
  return subprocess.run(
      _command(entry, args), cwd=REPO, capture_output=True, text=True, timeout=timeout
  )


def _run_here(entry, args, capsys, monkeypatch):
  """The command run in this process, as `python -m colorflax.ENTRY ARGS` runs it: its module's
  `cli.run(main, define_flags)`, from the repository (the config files import `configs`)."""
  module = importlib.import_module(f'colorflax.{entry}')
  monkeypatch.setattr(sys, 'argv', [f'{entry}.py', *args])
  monkeypatch.chdir(REPO)
  monkeypatch.syspath_prepend(REPO)
  # ml_collections loads every --config file as the module 'config_config', into the one left in
  # sys.modules if any: a file without get_config() would find the last file's.
  monkeypatch.delitem(sys.modules, 'config_config', raising=False)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited, warnings.catch_warnings():
    # ml_collections' loader; a separate process would print it only under -W.
    warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
    cli.run(module.main, module.define_flags)
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(sys.argv, exited.value.code, out, err)


def _assert_one_line(entry, r, code=2, fragment=''):
  """The command failed with `code` and one line (its last on stderr) saying what is wrong."""
  err = r.stderr.strip().splitlines()
  assert r.returncode == code, (r.returncode, r.stderr[-3000:])
  assert 'Traceback' not in r.stderr and err, r.stderr[-3000:]
  assert err[-1].startswith(f'{entry}.py: error: '), r.stderr[-3000:]
  assert fragment in err[-1], err[-1]


def _files(folder):
  """{path: bytes} of every file under `folder` (what a failed command must leave as it was)."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(dirpath, name), 'rb') as f:
        out[os.path.join(dirpath, name)] = f.read()
  return out


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize('entry', ENTRY_POINTS)
def test_a_config_typo_is_one_line(ctx, tmp_path, capsys, monkeypatch, entry):
  args = ENTRY_POINTS[entry].args(ctx, tmp_path) + ['--config.data.cachedir=x']
  r = _run_here(entry, args, capsys, monkeypatch)
  config = ENTRY_POINTS[entry].takes_config
  _assert_one_line(entry, r, fragment='cachedir' + (': no such config field' if config else ''))


@pytest.mark.parametrize('entry', [e for e in ENTRY_POINTS if ENTRY_POINTS[e].takes_config])
def test_an_invalid_config_value_is_one_line(ctx, tmp_path, capsys, monkeypatch, entry):
  args = ENTRY_POINTS[entry].args(ctx, tmp_path) + ['--config.batch_size=-1']
  r = _run_here(entry, args, capsys, monkeypatch)
  _assert_one_line(entry, r, fragment='config.batch_size: -1 is invalid')


BAD_CONFIG_FILES = {
    'no get_config': ('x = 1\n', 'defines no get_config()'),
    'returns a dict': ('def get_config():\n  return {"seed": 1}\n', 'returned a dict'),
    'syntax error': ('def get_config(:\n', 'is not valid Python'),
    'binary': (b'\x7fELF\x02\x01\x01\x00' * 8, 'is not a Python file'),
}


@pytest.mark.parametrize('entry', [e for e in ENTRY_POINTS if ENTRY_POINTS[e].takes_config])
@pytest.mark.parametrize('kind', BAD_CONFIG_FILES)
def test_a_bad_config_file_is_one_line(ctx, tmp_path, capsys, monkeypatch, entry, kind):
  content, fragment = BAD_CONFIG_FILES[kind]
  bad = tmp_path / 'bad_config.py'
  bad.write_bytes(content if isinstance(content, bytes) else content.encode())
  args = ENTRY_POINTS[entry].args(ctx, tmp_path)
  args = [f'--config={bad}'] + [a for a in args if a not in (ctx.config, '--config')]
  _assert_one_line(entry, _run_here(entry, args, capsys, monkeypatch), fragment=fragment)


@pytest.mark.parametrize('entry', [e for e in ENTRY_POINTS if ENTRY_POINTS[e].missing_input])
def test_a_missing_or_garbled_input_is_one_line(ctx, tmp_path, capsys, monkeypatch, entry):
  args = ENTRY_POINTS[entry].missing_input(ctx, tmp_path)
  _assert_one_line(entry, _run_here(entry, args, capsys, monkeypatch))


# --- Disks that refuse the writes ------------------------------------------------------------


def _fill(folder):
  """Fills the filesystem of `folder` to its last byte."""
  try:
    with open(os.path.join(folder, 'filler'), 'wb', buffering=0) as f:
      while True:
        f.write(b'\0' * 4096)
  except OSError:
    pass


@pytest.mark.parametrize('entry', ENTRY_POINTS)
@pytest.mark.parametrize('disk', ['full', 'read-only'])
def test_a_disk_that_refuses_the_writes_is_one_line_and_leaves_nothing_cut_off(
    ctx, tmp_path, small_disk, entry, disk
):
  with small_disk(tmp_path / 'disk', 256) as out:
    if disk == 'full':
      _fill(out)
    else:
      subprocess.run(['mount', '-o', 'remount,ro', str(out)], check=True)
    before = _files(out)
    r = _run(entry, ENTRY_POINTS[entry].args(ctx, out))
    _assert_one_line(entry, r)
    after = _files(out)
  written = {p: b for p, b in after.items() if p not in before}
  # Whatever it left is whole: a lock file (its process id), a config.json, never a cut-off
  # result, a .tmp file or an incomplete cache.
  for path, data in written.items():
    name = os.path.basename(path)
    assert name in ('.lock', 'cache.lock', checkpoints.CONFIG_FILE), path
    if name == checkpoints.CONFIG_FILE:
      json.loads(data)
  assert {p: b for p, b in after.items() if p in before} == before


# --- Signals at every moment -----------------------------------------------------------------


def _start(entry, args):
  return subprocess.Popen(
      _command(entry, args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


@pytest.mark.parametrize('entry', ENTRY_POINTS)
@pytest.mark.parametrize('delay', [0.5, 3.0])
def test_sigterm_as_the_command_starts_stops_it_cleanly(ctx, tmp_path, entry, delay):
  # Before colorflax's handlers are in place the default ends the process (-15: what a shell
  # reports as 143); after, one line and 143. Never a traceback, never a crash (it segfaulted
  # when the signal came while XLA was starting up or compiling).
  proc = _start(entry, ENTRY_POINTS[entry].args(ctx, tmp_path))
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  if proc.returncode == 0:  # it finished first
    assert ENTRY_POINTS[entry].done in out
    return
  assert proc.returncode in (143, -signal.SIGTERM), (proc.returncode, err[-3000:])
  assert 'Traceback' not in err and 'Fatal Python error' not in err, err[-3000:]
  if proc.returncode == 143:
    assert err.strip().splitlines()[-1].startswith(f'{entry}.py: '), err[-3000:]


@pytest.mark.parametrize('entry', [e for e in ENTRY_POINTS if not ENTRY_POINTS[e].runs_long])
def test_sigterm_once_the_command_is_done_changes_nothing(ctx, tmp_path, entry):
  proc = _start(entry, ENTRY_POINTS[entry].args(ctx, tmp_path))
  seen = ''
  for line in proc.stdout:
    seen += line
    if ENTRY_POINTS[entry].done in line:
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert ENTRY_POINTS[entry].done in seen, (seen, err[-3000:])
  assert proc.returncode == 0, (proc.returncode, err[-3000:])  # the work was done: a success
  assert 'Traceback' not in err, err[-3000:]


def _read_until(proc, marker):
  seen = ''
  for line in proc.stdout:
    seen += line
    if re.search(marker, line):
      return seen
  raise AssertionError(f'no {marker!r} in {seen!r}: {proc.stderr.read()[-3000:]}')


def test_sigterm_as_the_last_checkpoint_is_written_keeps_it(ctx, tmp_path):
  # The signal lands in the last epoch's checkpoint write (its line is printed first): the run
  # completes that checkpoint and ends as a finished run; the same command again has nothing left.
  args = ENTRY_POINTS['train'].args(ctx, tmp_path)
  proc = _start('train', args)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 300
  while (
      time.time() < deadline
      and len(metrics.read_text().splitlines() if metrics.exists() else []) < 2
  ):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode in (0, 143), err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  mngr = checkpoints.manager(tmp_path / 'run', read_only=True)
  assert mngr.latest_step() == 2 * (36 // 8) and not [
      d for d in os.listdir(tmp_path / 'run' / 'checkpoints') if 'tmp' in d
  ]
  again = _run('train', args)
  assert again.returncode == 0 and 'nothing to train' in again.stdout, again.stderr[-3000:]


# --- Two commands on one workdir, one cache --------------------------------------------------


def test_a_second_training_in_the_same_workdir_is_refused_and_the_first_unharmed(ctx, tmp_path):
  args = ENTRY_POINTS['train'].args(ctx, tmp_path)
  first = _start('train', args)
  _read_until(first, r'^training on')
  second = _run('train', args)
  _assert_one_line('train', second, fragment=f'is in use by process {first.pid}')
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in lines] == [1, 2]  # one run's lines, in order
  converted = _run('convert_torch', [ctx.pth, f'--workdir={tmp_path}/run', '--overwrite'])
  _assert_one_line('convert_torch', converted, fragment='holds the checkpoints of a training run')


def test_a_second_build_of_the_same_cache_is_refused(ctx, tmp_path):
  args = [
      '--config',
      ctx.config,
      f'--config.data.cache_dir={tmp_path}/cache',
      '--config.data.synthetic_images=48',
  ]
  first = _start('precompute_features', args)
  progress = os.path.join(
      features_cache.incomplete_dir(tmp_path / 'cache'), features_cache.PROGRESS
  )
  deadline = time.time() + 120
  while time.time() < deadline and not os.path.exists(progress):
    time.sleep(0.05)
  # Paused mid-build (its lock held), so that it is still building whatever the second's start-up
  # takes; then it goes on, undisturbed, to the end.
  first.send_signal(signal.SIGSTOP)
  try:
    second = _run('precompute_features', args)
  finally:
    first.send_signal(signal.SIGCONT)
  _assert_one_line('precompute_features', second, fragment=f'is in use by process {first.pid}')
  first.communicate(timeout=300)
  assert first.returncode == 0 and features_cache.open_cache(tmp_path / 'cache').num_images == 48
