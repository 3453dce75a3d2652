import importlib.metadata

import jax
import jax.numpy as jnp
import pytest

from colorflax import xla_flags

# colorflax sets its flag only on jaxlib >= 0.10 (test_an_older_jaxlib_gets_no_flag_it_may_not_know);
# the oldest supported releases (.ci/lowest_constraints.py) are older.
needs_new_jaxlib = pytest.mark.skipif(not xla_flags._jaxlib_knows_flags(),
                                      reason=f'jaxlib {importlib.metadata.version("jaxlib")} < 0.10: colorflax sets no flag')


@needs_new_jaxlib
def test_importing_colorflax_gives_xla_its_own_cpu_convolutions():
  # conftest set XLA_FLAGS before colorflax was imported; colorflax appended its flag to them.
  import os
  assert '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE' in os.environ['XLA_FLAGS']
  assert '--xla_force_host_platform_device_count=4' in os.environ['XLA_FLAGS']
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME'))
  hlo = conv.lower(jnp.ones((2, 8, 16, 16)), jnp.ones((32, 8, 3, 3))).compile().as_text()
  assert 'convolution(' in hlo and '__ynn_fusion' not in hlo  # YNNPACK would have taken it


def test_a_flag_the_user_set_is_kept(monkeypatch):
  monkeypatch.setattr(xla_flags, '_backends_initialized', lambda: False)
  monkeypatch.setattr(xla_flags, '_jaxlib_knows_flags', lambda: True)
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'}
  assert xla_flags.apply_defaults(env) == []
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'
  env = {}
  assert xla_flags.apply_defaults(env) == ['--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE']
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'


def test_too_late_warns_and_changes_nothing(monkeypatch):
  monkeypatch.setattr(xla_flags, '_jaxlib_knows_flags', lambda: True)
  jax.devices()  # the backends are running in this process
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  with pytest.warns(UserWarning, match='import colorflax first'):
    assert xla_flags.apply_defaults(env) == []
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


def test_an_older_jaxlib_gets_no_flag_it_may_not_know(monkeypatch):
  monkeypatch.setattr(xla_flags, '_backends_initialized', lambda: False)
  monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.9.2')
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  assert xla_flags.apply_defaults(env) == []
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
  monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.11.2')
  assert xla_flags.apply_defaults(env) != []
