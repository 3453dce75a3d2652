"""Every test process sees 4 fake CPU devices, so the data-parallel code paths run in CI.

The tests, and the processes they start, share one persistent XLA compilation cache for the
session: the same small programs (a model's initialisation, a training step, validation) are
compiled once, not in every test that trains (most of a small run's time is compilation).
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _XLA_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='colorflax-xla-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
else:
  _XLA_CACHE = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# The stop-on-signal tests need the usual dispositions. A test run started in the background of a
# script (`pytest &` ignores SIGINT) or under nohup (SIGHUP) inherits "ignored", which colorflax
# rightly leaves alone, and so would every process the tests start.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)


def pytest_sessionfinish(session, exitstatus):
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@contextlib.contextmanager
def _small_disk(folder, kilobytes):
  """A real filesystem of `kilobytes` at `folder` (a tmpfs), so that writes into it run out of
  space (ENOSPC) as on a full disk. Needs the right to mount (root, as in CI); else skipped."""
  os.makedirs(folder, exist_ok=True)
  r = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={kilobytes}k', 'tmpfs', str(folder)],
      capture_output=True,
      text=True,
  )
  if r.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs to fill up ({r.stderr.strip() or r.returncode})')
  try:
    yield folder
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=True)


@pytest.fixture
def small_disk():
  """`with small_disk(folder, kilobytes) as folder:` a filesystem that fills up (_small_disk)."""
  return _small_disk


def _running(pid):
  """Whether process `pid` exists and is not a zombie (a container's init may never reap)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.fixture
def still_running():
  """`still_running(pids)`: those of the processes `pids` still running after waiting up to a
  minute for them to end."""

  def wait(pids, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline and any(map(_running, pids)):
      time.sleep(0.2)
    return [pid for pid in pids if _running(pid)]

  return wait


# Real photographs the repository ships: the top row of docs/reference_example.jpg holds three
# 160 px photos (a sunset, citrus slices, mountains).
_PHOTO_SHEET = os.path.join(REPO, 'docs', 'reference_example.jpg')


@pytest.fixture(scope='session')
def real_photos(tmp_path_factory):
  """Three 160 px photos (JPEG) and a 480x120 panorama (PNG) cut from a shipped image."""
  from PIL import Image

  folder = tmp_path_factory.mktemp('photos')
  sheet = Image.open(_PHOTO_SHEET).convert('RGB')
  paths = []
  for i, box in enumerate([(160, 0, 320, 160), (320, 0, 480, 160), (480, 0, 640, 160)]):
    paths.append(folder / f'photo{i}.jpg')
    sheet.crop(box).save(paths[-1], quality=95)
  paths.append(folder / 'panorama.png')
  sheet.crop((160, 0, 640, 120)).save(paths[-1])
  return paths


@pytest.fixture(scope='session')
def small_cache(tmp_path_factory):
  """test_train's small synthetic features cache, shared by the modules that only need a run."""
  from test_train import small_config

  from colorflax import precompute_features

  d = tmp_path_factory.mktemp('small-cache') / 'synthetic32'
  precompute_features.precompute(small_config(d), progress=False)
  return d


@pytest.fixture(scope='session')
def small_run(small_cache, tmp_path_factory):
  """(workdir, its config): the seed model (mse) trained for one epoch on `small_cache`."""
  from test_train import small_config

  from colorflax import checkpoints, train

  work = tmp_path_factory.mktemp('small-run') / 'run'
  config = small_config(small_cache, num_epochs=1, samples_every_epochs=0)
  train.train_and_evaluate(config, str(work), progress=False)
  return work, checkpoints.read_config(str(work))


@pytest.fixture(scope='session')
def hinted_run(small_cache, tmp_path_factory):
  """(workdir, its config): a colour-hints model (model.hints) trained on `small_cache` long
  enough to follow hints."""
  from test_train import small_config

  from colorflax import train

  work = tmp_path_factory.mktemp('hinted') / 'run'
  over = {'model.hints': True, 'samples_every_epochs': 0, 'num_epochs': 12, 'learning_rate': 3e-3}
  config = small_config(small_cache, **over)
  train.train_and_evaluate(config, str(work), progress=False)
  return work, config
