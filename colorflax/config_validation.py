"""Checks a resolved config before any heavy work, so that a typo costs a second, not a run."""

import os

from colorflax.errors import ConfigError

RESIZE_MODES = ('squash', 'center_crop')
FEATURE_KINDS = ('logits', 'probs', 'pool')
NAMED_WEIGHTS = ('auto', 'imagenet', 'random')
DTYPES = ('float32', 'bfloat16')


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


def validate(config):
  """Raises ConfigError naming the first invalid field. Fields a config lacks are not checked."""
  positive_int = lambda v: _is_int(v) and v > 0
  _require(config, 'seed', _is_int, 'an integer')
  _require(config, 'batch_size', positive_int, 'a positive integer')
  _require(config, 'num_epochs', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'learning_rate', lambda v: isinstance(v, (int, float)) and v > 0, 'a positive number')
  _require(config, 'data.source', lambda v: isinstance(v, str) and v.strip() != '',
           "a folder path, 'tfds:NAME[:SPLIT]' or 'synthetic'")
  _require(config, 'data.cache_dir', lambda v: isinstance(v, str) and v.strip() != '', 'a directory path')
  _require(config, 'data.image_size', lambda v: positive_int(v) and v % 8 == 0,
           'a positive multiple of 8 (the encoder pools three times)')
  _require(config, 'data.resize', lambda v: v in RESIZE_MODES, f'one of {RESIZE_MODES}')
  _require(config, 'data.val_fraction', lambda v: isinstance(v, (int, float)) and 0 < v < 1,
           'a fraction strictly between 0 and 1')
  _require(config, 'data.synthetic_images', positive_int, 'a positive integer')
  _require(config, 'data.max_image_pixels', positive_int, 'a positive integer')
  _require(config, 'features.calibration_images', positive_int, 'a positive integer')
  _require(config, 'features.num_shards', positive_int, 'a positive integer')
  _require(config, 'features.shard_index', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  if not key_missing(config, 'features.num_shards') and config.features.shard_index >= config.features.num_shards:
    raise ConfigError('features.shard_index', f'{config.features.shard_index} is invalid: must be below '
                      f'features.num_shards ({config.features.num_shards})')
  _require(config, 'features.kind', lambda v: v in FEATURE_KINDS, f'one of {FEATURE_KINDS}')
  _require(config, 'features.inception_weights',
           lambda v: isinstance(v, str) and (v in NAMED_WEIGHTS or v.endswith(('.pth', '.pt'))),
           f'one of {NAMED_WEIGHTS} or a path to a torchvision .pth file')
  _require(config, 'features.batch_size', positive_int, 'a positive integer')
  _require(config, 'features.num_workers', lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0 = all cores)')
  _require(config, 'model.width', lambda v: isinstance(v, (int, float)) and v > 0, 'a positive number (1.0 = the seed)')
  _require(config, 'model.dtype', lambda v: v in DTYPES, f'one of {DTYPES}')
  _require(config, 'model.polyphase_dec3', lambda v: str(v).lower() in ('auto', 'true', 'false', '1', '0'),
           "'auto', 'true' or 'false'")
  for key in ('augment.rotation_degrees', 'augment.shear'):
    _require(config, key, lambda v: isinstance(v, (int, float)) and v >= 0, 'a number >= 0')
  _require(config, 'augment.flip_probability', lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
           'a probability in [0, 1]')
  _require(config, 'augment.fill_mode', lambda v: v in ('nearest', 'constant'), "'nearest' or 'constant'")
  _require(config, 'data.placement', lambda v: v in ('auto', 'resident', 'streaming'),
           "'auto', 'resident' or 'streaming'")
  _require(config, 'data.device_budget_fraction', lambda v: isinstance(v, (int, float)) and 0 < v <= 1, 'in (0, 1]')
  _require(config, 'data.stream_workers', lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0 = threads only)')
  _require(config, 'data.stream_threads', positive_int, 'a positive integer')
  _require(config, 'data.stream_prefetch', positive_int, 'a positive integer')
  _require(config, 'num_devices', lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0 = all devices)')
  _require(config, 'per_device_batch_size', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'eval_batch_size', lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0 = batch_size)')
  _require(config, 'steps_per_dispatch', positive_int, 'a positive integer')
  _require(config, 'num_processes', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'process_id', lambda v: _is_int(v) and v >= -1, 'an integer >= -1')
  _require(config, 'step_loop', lambda v: v in ('auto', 'device', 'host'), "'auto', 'device' or 'host'")
  _require(config, 'init_from', lambda v: isinstance(v, str), "a workdir path, or '' for none")
  _require(config, 'init_checkpoint', lambda v: isinstance(v, str) and (v in ('best', 'latest') or v.isdigit()),
           "'best', 'latest' or a step number")
  _require(config, 'checkpoint_every_steps', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'keep_checkpoints', positive_int, 'a positive integer')
  _require(config, 'samples_every_epochs', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'num_samples', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'plateau.factor', lambda v: isinstance(v, (int, float)) and 0 < v < 1, 'in (0, 1)')
  _require(config, 'plateau.patience', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'plateau.cooldown', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  _require(config, 'plateau.threshold', lambda v: isinstance(v, (int, float)) and v >= 0, 'a number >= 0')
  _require(config, 'plateau.min_scale', lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, 'in [0, 1]')
  weights = '' if key_missing(config, 'features.inception_weights') else config.features.inception_weights
  if weights.endswith(('.pth', '.pt')) and not os.path.isfile(os.path.expanduser(weights)):
    raise ConfigError('features.inception_weights', f'no such weights file: {weights}')
  return config
