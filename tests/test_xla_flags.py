import importlib.metadata
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from colorflax import xla_flags

# colorflax sets its flag only on jaxlib >= 0.10
# (test_an_older_jaxlib_gets_no_flag_it_may_not_know);
# the oldest supported releases (.ci/lowest_constraints.py) are older.
needs_new_jaxlib = pytest.mark.skipif(
    not xla_flags._jaxlib_knows_flags(),
    reason=f'jaxlib {importlib.metadata.version("jaxlib")} < 0.10: colorflax sets no flag',
)


@needs_new_jaxlib
def test_importing_colorflax_gives_xla_its_own_cpu_convolutions():
  # conftest set XLA_FLAGS before colorflax was imported; colorflax appended its flag to them.
  assert (
      '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE' in os.environ['XLA_FLAGS']
  )
  assert '--xla_force_host_platform_device_count=4' in os.environ['XLA_FLAGS']
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME'))
  hlo = conv.lower(jnp.ones((2, 8, 16, 16)), jnp.ones((32, 8, 3, 3))).compile().as_text()
  assert 'convolution(' in hlo and '__ynn_fusion' not in hlo  # YNNPACK would have taken it


def _flags_after_import(code_before='', **env):
  """XLA_FLAGS as a new process sees it after `import colorflax` (after `code_before` ran), and
  what it printed on stderr."""
  environ = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  environ.update(env)
  code = f'{code_before}\nimport os, colorflax\nprint(os.environ.get("XLA_FLAGS"))'
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=environ)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip(), r.stderr


@needs_new_jaxlib
def test_a_flag_the_user_set_is_kept():
  dot = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'
  assert _flags_after_import(XLA_FLAGS=dot)[0] == dot
  assert (
      _flags_after_import()[0]
      == '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'
  )


@needs_new_jaxlib
def test_too_late_warns_and_changes_nothing():
  flags, err = _flags_after_import(
      'import jax; jax.devices()  # the backends start',
      XLA_FLAGS='--xla_force_host_platform_device_count=4',
  )
  assert flags == '--xla_force_host_platform_device_count=4'
  assert 'import colorflax first' in err


def test_an_older_jaxlib_gets_no_flag_it_may_not_know():
  pretend = (
      'import importlib.metadata as m; real = m.version\n'
      "m.version = lambda name: '{}' if name == 'jaxlib' else real(name)"
  )
  before = '--xla_force_host_platform_device_count=4'
  assert _flags_after_import(pretend.format('0.9.2'), XLA_FLAGS=before)[0] == before
  assert _flags_after_import(pretend.format('0.11.2'), XLA_FLAGS=before)[0] != before
