"""Checks a resolved config before any heavy work, so that a typo costs a second, not a run.

Each field's valid choices are declared once, by the module that implements them, and imported
here.
"""

import os

from colorflax.errors import ConfigError

# features.inception_weights, besides a path to a .pth file (colorflax.inception loads them).
NAMED_WEIGHTS = ('auto', 'imagenet', 'random')


def get_field(config, key):
  """config['a']['b'] for key 'a.b'."""
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _require(config, key, ok, what):
  if key_missing(config, key):
    return
  value = get_field(config, key)
  if not ok(value):
    raise ConfigError(key, f'{value!r} is invalid: must be {what}')


def key_missing(config, key):
  try:
    get_field(config, key)
    return False
  except (KeyError, AttributeError):
    return True


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rules():
  """(field, valid, what it must be), in the order they are checked."""
  from colorflax import augment, checkpoints, device_pipeline, image_io, losses, model, train_step

  positive_int = lambda v: _is_int(v) and v > 0
  at_least = lambda n: lambda v: _is_int(v) and v >= n
  one_of = lambda choices: (lambda v: v in choices, f'one of {choices}')
  text = lambda v: isinstance(v, str) and v.strip() != ''
  feature_kinds, dtypes = tuple(model.EMBEDDING_DIMS), tuple(model.DTYPES)
  weights = lambda v: isinstance(v, str) and (v in NAMED_WEIGHTS or v.endswith(('.pth', '.pt')))
  which = lambda v: isinstance(v, str) and (v in checkpoints.WHICH or v.isdigit())
  return [
      ('seed', _is_int, 'an integer'),
      ('batch_size', positive_int, 'a positive integer'),
      ('num_epochs', at_least(0), 'an integer >= 0'),
      ('learning_rate', lambda v: _number(v) and v > 0, 'a positive number'),
      ('data.source', text, "a folder path, 'tfds:NAME[:SPLIT]' or 'synthetic'"),
      ('data.cache_dir', text, 'a directory path'),
      (
          'data.image_size',
          lambda v: positive_int(v) and v % 8 == 0,
          'a positive multiple of 8 (the encoder pools three times)',
      ),
      ('data.resize', *one_of(image_io.RESIZE_MODES)),
      (
          'data.val_fraction',
          lambda v: _number(v) and 0 < v < 1,
          'a fraction strictly between 0 and 1',
      ),
      ('data.synthetic_images', positive_int, 'a positive integer'),
      ('data.max_image_pixels', positive_int, 'a positive integer'),
      ('features.calibration_images', positive_int, 'a positive integer'),
      ('features.num_shards', positive_int, 'a positive integer'),
      ('features.shard_index', at_least(0), 'an integer >= 0'),
      ('features.kind', *one_of(feature_kinds)),
      (
          'features.inception_weights',
          weights,
          f'one of {NAMED_WEIGHTS} or a path to a torchvision .pth file',
      ),
      ('features.batch_size', positive_int, 'a positive integer'),
      ('features.num_workers', at_least(0), 'an integer >= 0 (0 = all cores)'),
      ('model.width', lambda v: _number(v) and v > 0, 'a positive number (1.0 = the seed)'),
      ('model.dtype', *one_of(dtypes)),
      (
          'model.polyphase_dec3',
          lambda v: str(v).lower() in model.POLYPHASE_DEC3 + ('1', '0'),
          "'auto', 'true' or 'false'",
      ),
      ('model.hints', lambda v: isinstance(v, bool), 'true or false'),
      ('hints.p', lambda v: _number(v) and 0 < v <= 1, 'a probability in (0, 1]'),
      ('hints.max_points', positive_int, 'a positive integer'),
      ('hints.max_patch', positive_int, 'a positive integer'),
      ('augment.rotation_degrees', lambda v: _number(v) and v >= 0, 'a number >= 0'),
      ('augment.shear', lambda v: _number(v) and v >= 0, 'a number >= 0'),
      ('augment.flip_probability', lambda v: _number(v) and 0 <= v <= 1, 'a probability in [0, 1]'),
      ('augment.fill_mode', *one_of(augment.FILL_MODES)),
      ('data.placement', *one_of(device_pipeline.PLACEMENTS)),
      ('data.device_budget_fraction', lambda v: _number(v) and 0 < v <= 1, 'in (0, 1]'),
      ('data.stream_workers', at_least(0), 'an integer >= 0 (0 = threads only)'),
      ('data.stream_threads', positive_int, 'a positive integer'),
      ('data.stream_prefetch', positive_int, 'a positive integer'),
      ('num_devices', at_least(0), 'an integer >= 0 (0 = all devices)'),
      ('per_device_batch_size', at_least(0), 'an integer >= 0'),
      ('eval_batch_size', at_least(0), 'an integer >= 0 (0 = batch_size)'),
      ('steps_per_dispatch', positive_int, 'a positive integer'),
      ('num_processes', at_least(0), 'an integer >= 0'),
      ('process_id', at_least(-1), 'an integer >= -1'),
      ('step_loop', *one_of(train_step.STEP_LOOPS)),
      ('init_from', lambda v: isinstance(v, str), "a workdir path, or '' for none"),
      ('init_checkpoint', which, "'best', 'latest' or a step number"),
      ('checkpoint_every_steps', at_least(0), 'an integer >= 0'),
      ('keep_checkpoints', positive_int, 'a positive integer'),
      ('samples_every_epochs', at_least(0), 'an integer >= 0'),
      ('num_samples', at_least(0), 'an integer >= 0'),
      ('loss', *one_of(losses.LOSSES)),
      ('huber_delta', lambda v: _number(v) and v > 0, 'a positive number'),
      ('classification.temperature', lambda v: _number(v) and v > 0, 'a positive number'),
      ('classification.neighbours', positive_int, 'a positive integer'),
      ('classification.sigma', lambda v: _number(v) and v > 0, 'a positive number'),
      ('classification.prior_sigma', lambda v: _number(v) and v > 0, 'a positive number'),
      ('classification.rebalance', lambda v: _number(v) and 0 <= v <= 1, 'in [0, 1]'),
      ('ema_decay', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1) (0 = off)'),
      ('plateau.factor', lambda v: _number(v) and 0 < v < 1, 'in (0, 1)'),
      ('plateau.patience', at_least(0), 'an integer >= 0'),
      ('plateau.cooldown', at_least(0), 'an integer >= 0'),
      ('plateau.threshold', lambda v: _number(v) and v >= 0, 'a number >= 0'),
      ('plateau.min_scale', lambda v: _number(v) and 0 <= v <= 1, 'in [0, 1]'),
  ]


def validate(config):
  """Raises ConfigError naming the first invalid field. Fields a config lacks are not checked."""
  for key, ok, what in _rules():
    _require(config, key, ok, what)
    if key == 'features.shard_index' and not key_missing(config, 'features.num_shards'):
      shard, shards = config.features.shard_index, config.features.num_shards
      if shard >= shards:
        raise ConfigError(key, f'{shard} is invalid: must be below features.num_shards ({shards})')
  weights = (
      '' if key_missing(config, 'features.inception_weights') else config.features.inception_weights
  )
  if weights.endswith(('.pth', '.pt')) and not os.path.isfile(os.path.expanduser(weights)):
    raise ConfigError('features.inception_weights', f'no such weights file: {weights}')
  return config
