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
