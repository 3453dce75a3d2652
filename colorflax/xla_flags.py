"""XLA flags colorflax sets for itself, before JAX creates its CPU backend.

XLA:CPU hands convolutions to YNNPACK by default, whose weight gradients run at 60–80 GFLOP/s
on the seed's layers against 180–280 for XLA's own (Eigen) convolution kernels, which are as
fast for the forward pass and the input gradient (BENCHMARKS.md: the 128 px CPU step went from
1.63–1.67 to 1.47–1.53 s). YNNPACK keeps the reductions (the bias and BatchNorm gradients),
where it is faster than XLA's own. The flags touch the CPU backend only.

A flag already in `XLA_FLAGS` is left as the user set it; this works only if colorflax is
imported before JAX first initialises its backends (it warns otherwise).
"""

import importlib.metadata
import os
import re
import sys
import warnings

DEFAULTS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
# XLA aborts on a flag it does not know; jaxlib 0.10 is the oldest these were measured with
# (older ones may predate YNNPACK, and their convolutions are XLA's own anyway).
MIN_JAXLIB = (0, 10)


def _jaxlib_knows_flags() -> bool:
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return False
  return tuple(int(n) for n in re.findall(r'\d+', version)[:2]) >= MIN_JAXLIB


def _backends_initialized() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a JAX without it: assume not, as on import
    return False


def apply_defaults(environ=os.environ) -> list[str]:
  """Appends each default flag that `XLA_FLAGS` does not set already; returns those appended."""
  current = environ.get('XLA_FLAGS', '')
  added = [f'--{name}={value}' for name, value in DEFAULTS.items() if f'--{name}' not in current]
  if not added or not _jaxlib_knows_flags():
    return []
  if _backends_initialized():
    warnings.warn(
        'colorflax was imported after JAX started its backends, so XLA:CPU keeps its '
        'YNNPACK convolutions (slower weight gradients: BENCHMARKS.md); import colorflax '
        f'first or set XLA_FLAGS="{" ".join(added)}"',
        stacklevel=3,
    )
    return []
  environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return added
