"""Where images come from: a folder, a TensorFlow Datasets dataset, or the synthetic generator.

A source is a picklable list of ids plus `item(i)`, which returns what `image_io.prepare` takes
(a path, encoded bytes) or, for the synthetic source, the finished uint8 image. Worker
processes call `item` themselves, so decoding runs in parallel with Inception.
"""

import os

import numpy as np

from colorflax import image_io, synthetic
from colorflax.errors import UserError


class FolderSource:
  """Every image file below `root` (recursive, by extension), in sorted order."""

  def __init__(self, root):
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(self.root):
      raise UserError(f'data.source: no such folder: {root}')
    if not os.path.isdir(self.root):
      raise UserError(f'data.source: not a folder: {root}')
    found, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
      # Links are followed, but each folder is read once: a link back up the tree (a cycle) or
      # two links to one folder would otherwise list its images again and again.
      st = os.stat(dirpath)
      if (st.st_dev, st.st_ino) in walked:
        dirnames[:] = []
        continue
      walked.add((st.st_dev, st.st_ino))
      dirnames.sort()
      for name in filenames:
        if name.lower().endswith(image_io.IMAGE_EXTENSIONS) and not name.startswith('._'):
          found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
    self.ids = sorted(found)
    if not self.ids:
      raise UserError(
          f'data.source: no images ({", ".join(image_io.IMAGE_EXTENSIONS)}) found in {root}'
      )
    self.description = self.root

  def item(self, i):
    return os.path.join(self.root, self.ids[i])


class TfdsSource:
  """A prepared TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow)."""

  def __init__(self, name, split='train', data_dir=None, image_key='image'):
    self.name, self.split, self.image_key = name, split, image_key
    self.data_dir = os.path.expanduser(data_dir) if data_dir else None
    self._ds = None
    n = len(self._open())
    if n == 0:
      raise UserError(f'data.source: tfds:{name}:{split} is empty')
    self.ids = [f'tfds:{name}:{split}:{i}' for i in range(n)]
    self.description = f'tfds:{name}:{split}'

  def _open(self):
    if self._ds is None:
      try:
        import tensorflow_datasets as tfds
      except ImportError:
        raise UserError(
            "data.source: tfds sources need tensorflow-datasets: pip install 'colorflax[tfds]'"
        ) from None
      try:
        self._ds = tfds.data_source(
            self.name,
            split=self.split,
            data_dir=self.data_dir,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
      except Exception as e:  # not found, not prepared, not array_record, unknown split
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f'data.source: cannot open tfds:{self.name}:{self.split} ({first}). Prepare it once '
            f'(this step needs TensorFlow): tfds build {self.name} --file_format=array_record'
            + (f' --data_dir={self.data_dir}' if self.data_dir else '')
        ) from None
    return self._ds

  def __getstate__(self):  # workers reopen the data source themselves
    return {**self.__dict__, '_ds': None}

  def item(self, i):
    record = self._open()[i]
    if self.image_key not in record:
      raise UserError(
          f'data.tfds_image_key: {self.image_key!r} is not a feature of {self.description} '
          f'(it has {sorted(record)})'
      )
    return bytes(record[self.image_key])


class SyntheticSource:
  """The built-in procedural landscapes (colorflax.synthetic), generated at the target size."""

  def __init__(self, count, size, seed):
    self.count, self.size, self.seed = count, size, seed
    self.ids = [f'synthetic:{i}' for i in range(count)]
    self.description = self.describe(count, seed)

  @staticmethod
  def describe(count, seed):
    return f'synthetic ({count} landscapes, seed {seed})'

  def item(self, i):
    return synthetic.landscape(i, self.size, self.seed)


def _tfds_name_and_split(spec):
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[1]:
    raise UserError(f"data.source: expected 'tfds:NAME' or 'tfds:NAME:SPLIT', got {spec!r}")
  return parts[1], parts[2] if len(parts) == 3 and parts[2] else 'train'


def from_config(config):
  spec = config.data.source.strip()
  if spec == 'synthetic':
    return SyntheticSource(config.data.synthetic_images, config.data.image_size, config.seed)
  if spec.startswith('tfds:'):
    name, split = _tfds_name_and_split(spec)
    return TfdsSource(name, split, config.data.tfds_data_dir or None, config.data.tfds_image_key)
  return FolderSource(spec)


def describe(config, seed):
  """The `description` that `from_config(config)` would give its source, without listing or
  opening anything: training compares it with the one its cache recorded. `seed` stands for
  config.seed, which only the synthetic source depends on (pass the cache's: a training run
  may use another seed on the same images)."""
  spec = config.data.source.strip()
  if spec == 'synthetic':
    return SyntheticSource.describe(config.data.synthetic_images, seed)
  if spec.startswith('tfds:'):
    return 'tfds:{}:{}'.format(*_tfds_name_and_split(spec))
  return os.path.abspath(os.path.expanduser(spec))


def prepare_item(source, i, size, resize, skip_grayscale, max_pixels):
  """(index, uint8 image or None, skip reason or None): the unit of work of a decode worker."""
  try:
    raw = source.item(i)
    if isinstance(raw, np.ndarray):
      image = raw
      if skip_grayscale and image_io.is_grayscale(image):
        raise image_io.SkipImage('grayscale (no colour to learn)')
    else:
      image = image_io.prepare(raw, size, resize, skip_grayscale, max_pixels)
    return i, image, None
  except image_io.SkipImage as e:
    return i, None, str(e)
  except OSError as e:  # vanished or unreadable between listing and reading
    return i, None, f'unreadable: {e.strerror or e}'
