"""Every test process sees 4 fake CPU devices, so the data-parallel code paths run in CI."""

import os
import signal
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# The stop-on-signal tests need the usual dispositions. A test run started in the background of a
# script (`pytest &` ignores SIGINT) or under nohup (SIGHUP) inherits "ignored", which colorflax
# rightly leaves alone, and so would every process the tests start.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
