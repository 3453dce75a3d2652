"""The devices a run uses, and how arrays are laid out on them.

One process or several (`jax.distributed`, one per host or per GPU); in every case a 1-D mesh
over the run's devices, axis 'data': batches are split along it, the model's state is
replicated. The same layout serves training, evaluation, colorization and the benchmark.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from colorflax.errors import UserError

DATA_AXIS = 'data'


def initialize(config):
  """jax.distributed.initialize() once, when the config asks for several processes."""
  if not config.distributed or jax.distributed.is_initialized():
    return
  # CPU devices in different processes need a collectives library to talk to each other (GPUs
  # and TPUs bring their own; this setting does not touch them).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  explicit = {}
  if config.coordinator_address:
    explicit = dict(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )
  jax.distributed.initialize(**explicit)


def run_devices(config):
  """The devices a run uses: the first config.num_devices (0 = all of them)."""
  devices = jax.devices()
  if config.num_devices > len(devices):
    raise UserError(f'config.num_devices: {config.num_devices} requested, {len(devices)} available')
  return devices[: config.num_devices or len(devices)]


def global_batch_size(config, num_devices):
  """The batch over all devices: per_device_batch_size x devices if set, else batch_size, which
  must split evenly over them."""
  per_device = config.per_device_batch_size
  batch = per_device * num_devices if per_device else config.batch_size
  if batch % num_devices:
    raise UserError(
        f'config.batch_size: {batch} does not split evenly over {num_devices} devices; '
        f'use a multiple of {num_devices} or set per_device_batch_size'
    )
  return batch


def data_mesh(devices=None):
  """A 1-D mesh over `devices` (default: every device of every process). Auto axes: XLA
  propagates the batch sharding through the gather, model and loss itself."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh):
  """Every device holds the whole array (the model's state, resident tables)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """A batch (B, ...) split along B."""
  return NamedSharding(mesh, P(DATA_AXIS))


def dispatch_sharding(mesh):
  """A dispatch's K batches (K, B, ...), each split along B."""
  return NamedSharding(mesh, P(None, DATA_AXIS))
