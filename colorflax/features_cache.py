"""The features cache: resized images and their Inception-v3 embeddings, as arrays on disk.

  CACHE/images.npy      uint8   (N, S, S, 3)
  CACHE/embeddings.npy  float32 (N, D)
  CACHE/manifest.json   what was cached, from where, how, and what was skipped (and why)

Written by `colorflax.cache_writer`; read here: `open_cache` memory-maps a finished cache and
validates it, and the checks say in one line when a cache does not hold what a config names.
"""

import dataclasses
import hashlib
import json
import os
import re
import shlex

import numpy as np

from colorflax import files, sources
from colorflax.errors import UserError
from colorflax.model import EMBEDDING_DIMS

MANIFEST = 'manifest.json'
PROGRESS = 'progress.json'  # in CACHE.incomplete/: how far an interrupted build got
PROGRESS_EVERY_SECONDS = 2.0  # each record flushes the rows to disk first (fsync)
FORMAT_VERSION = 1


def parts_root(cache_dir) -> str:
  """Where a sharded precompute writes its parts, beside the cache they will be merged into."""
  return os.path.abspath(os.path.expanduser(cache_dir)).rstrip('/') + '.parts'


def part_dir(cache_dir, shard, shards) -> str:
  return os.path.join(parts_root(cache_dir), f'part-{shard:05d}-of-{shards:05d}')


def part_dirs(cache_dir):
  """The folders of a sharded build's parts (finished or not), sorted."""
  root = parts_root(cache_dir)
  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  return [os.path.join(root, p) for p in names if p.startswith('part-') and '.' not in p]


def finished(cache_dir) -> bool:
  """Whether `cache_dir` holds a finished cache (or part), as far as its manifest tells."""
  try:
    return read_manifest(cache_dir) is not None
  except DamagedCache:
    return False


def incomplete_dir(cache_dir) -> str:
  return os.path.abspath(os.path.expanduser(cache_dir)).rstrip('/') + '.incomplete'


def fingerprint(settings: dict) -> str:
  """A short hash of everything that determines a cache's contents."""
  blob = json.dumps(settings, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass
class Cache:
  directory: str
  manifest: dict
  images: np.ndarray  # memory-mapped uint8 (N, S, S, 3)
  embeddings: np.ndarray  # memory-mapped float32 (N, D)

  @property
  def num_images(self):
    return self.manifest['num_images']

  @property
  def image_size(self):
    return self.manifest['image_size']

  @property
  def embedding_dim(self):
    return self.manifest['embedding_dim']


# What a cache folder holds: anything else there is not the cache's to delete on --overwrite.
CACHE_FILES = ('images.npy', 'embeddings.npy', MANIFEST, 'inception_batchnorm.pth')
# The manifest's fields that readers rely on, and their types.
_MANIFEST_FIELDS = {'num_images': int, 'image_size': int, 'embedding_dim': int, 'files': list}


class DamagedCache(UserError):
  """A cache folder whose manifest or arrays cannot be used as they are."""


def read_manifest(cache_dir):
  """The manifest of the cache at `cache_dir`, or None if it has none; DamagedCache if it is not
  a manifest colorflax wrote (not JSON, fields missing: e.g. edited by hand)."""
  path = os.path.join(os.path.expanduser(cache_dir), MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise DamagedCache(f'{path} is unreadable ({e})') from None
  if not isinstance(manifest, dict):
    raise DamagedCache(f'{path} is not a cache manifest (a JSON {type(manifest).__name__})')
  for field, kind in _MANIFEST_FIELDS.items():
    if not isinstance(manifest.get(field), kind):
      raise DamagedCache(f'{path} has no valid {field!r} (a cache manifest written by hand?)')
  return manifest


HISTOGRAM_PREFIX = 'ab_histogram-'  # the training colours of a split (train.class_weights)


def foreign_files(cache_dir):
  """The files and folders in `cache_dir` that are not a cache's own (sorted)."""
  names = set(os.listdir(cache_dir)) - set(CACHE_FILES)
  return sorted(n for n in names if not (n.startswith(HISTOGRAM_PREFIX) and n.endswith('.npy')))


def lock(cache_dir):
  """The lock of a cache being built (or merged): one command at a time (colorflax.locks). A
  file beside the cache, as the cache's own folder is replaced whole when it is done."""
  from colorflax import locks

  final = os.path.abspath(os.path.expanduser(cache_dir)).rstrip('/')
  files.create_folder(os.path.dirname(final), 'config.data.cache_dir')
  return locks.exclusive(
      final + '.lock',
      f'the features cache {final}',
      'wait for the other precompute_features to finish, or stop it',
  )


def open_cache(
    cache_dir,
    precompute_hint='python -m colorflax.precompute_features --config CONFIG',
    rebuild=None,
) -> Cache:
  """Memory-maps a finished cache and checks that its parts agree with each other. `rebuild`:
  what a damaged cache's message advises (default: the precompute command with --overwrite)."""
  rebuild = rebuild or f'rebuild it: {precompute_hint} --overwrite'
  cache_dir = os.path.expanduser(cache_dir)
  if os.path.isfile(cache_dir):
    raise UserError(f'data.cache_dir: {cache_dir} is a file, not a cache directory')
  try:
    manifest = read_manifest(cache_dir)
  except DamagedCache as e:
    raise DamagedCache(f'{e}; {rebuild}') from None
  if manifest is None:
    if os.path.isdir(parts_root(cache_dir)):
      done = [p for p in part_dirs(cache_dir) if finished(p)]
      raise UserError(
          f'{cache_dir} is a sharded cache that has not been merged '
          f'({len(done)} finished part(s) in '
          f'{parts_root(cache_dir)}); finish every shard, then run: {precompute_hint} --merge'
      )
    if os.path.exists(incomplete_dir(cache_dir)):
      raise UserError(
          f'no features cache at {cache_dir} '
          f'(an interrupted run left {incomplete_dir(cache_dir)}); '
          f'finish it with: {precompute_hint} (the same settings continue from where it stopped)'
      )
    raise UserError(f'no features cache at {cache_dir}; build it with: {precompute_hint}')
  if manifest.get('format_version') != FORMAT_VERSION:
    raise UserError(
        f'{cache_dir} has cache format {manifest.get("format_version")}, '
        f'expected {FORMAT_VERSION}; {rebuild}'
    )
  try:  # a truncated array is refused here: its memory map would be longer than the file
    images = np.load(os.path.join(cache_dir, 'images.npy'), mmap_mode='r')
    embeddings = np.load(os.path.join(cache_dir, 'embeddings.npy'), mmap_mode='r')
  except (OSError, ValueError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else e
    raise DamagedCache(f'{cache_dir} is damaged ({reason}); {rebuild}') from None
  n, s, d = manifest['num_images'], manifest['image_size'], manifest['embedding_dim']
  problems = []
  if images.shape != (n, s, s, 3) or images.dtype != np.uint8:
    problems.append(
        f'images.npy is {images.dtype}{images.shape}, manifest says uint8{(n, s, s, 3)}'
    )
  if embeddings.shape != (n, d) or embeddings.dtype != np.float32:
    problems.append(
        f'embeddings.npy is {embeddings.dtype}{embeddings.shape}, manifest says float32{(n, d)}'
    )
  if len(manifest.get('files', [])) != n:
    problems.append(f'manifest lists {len(manifest.get("files", []))} files for {n} rows')
  if problems:
    raise DamagedCache(f'{cache_dir} is inconsistent: {problems[0]}; {rebuild}')
  return Cache(cache_dir, manifest, images, embeddings)


def check_matches_config(
    cache,
    config,
    hint='python -m colorflax.precompute_features --config CONFIG',
    size_is_a_choice=False,
):
  """A cache built for another image size or feature kind than `config` asks for: one clear line.
  `size_is_a_choice` (evaluation: the model is convolutional): name the override that uses the
  cache's size, rather than ask for a rebuild."""
  want_dim = EMBEDDING_DIMS[config.features.kind]
  if cache.image_size != config.data.image_size:
    if size_is_a_choice:
      # config.data.image_size: the run's, or the size asked for on the command line.
      raise UserError(
          f'the cache at {config.data.cache_dir} holds {cache.image_size}px images, not '
          f'{config.data.image_size}px (data.image_size); to evaluate at {cache.image_size}px '
          f'add --config.data.image_size={cache.image_size} (the model runs at any multiple of 8)'
      )
    raise UserError(
        f'the cache at {config.data.cache_dir} holds {cache.image_size}px images but '
        f'data.image_size is {config.data.image_size}; rebuild it: {hint} --overwrite'
    )
  if (
      cache.embedding_dim != want_dim
      or cache.manifest.get('embedding_kind') != config.features.kind
  ):
    raise UserError(
        f'the cache at {config.data.cache_dir} holds {cache.manifest.get("embedding_kind")} '
        f'features ({cache.embedding_dim}-d) but features.kind is {config.features.kind}; '
        f'rebuild it: {hint} --overwrite'
    )


def check_built_for(cache, config, hint='python -m colorflax.precompute_features --config CONFIG'):
  """A cache of other images than `config` names (data.source, data.resize): one clear line,
  rather than a run that trains on them silently. Training asks this; evaluation does not (any
  cache may be evaluated). Fields a cache did not record (hand-made caches) are not compared.
  features.inception_weights is not: training never reads it, and colorization takes the
  weights from the cache's record."""
  settings = cache.manifest.get('settings') or {}
  where = f'the cache at {config.data.cache_dir}'
  recorded = cache.manifest.get('source')
  if recorded is not None and 'seed' in settings:
    wanted = sources.describe(config, settings['seed'])
    if wanted != recorded:  # not --overwrite: that cache may have taken hours to build
      synthetic = re.fullmatch(r'synthetic \((\d+) landscapes, seed .*\)', recorded)
      fits = (
          f'--config.data.source=synthetic --config.data.synthetic_images={synthetic.group(1)}'
          if synthetic
          else f'--config.data.source={shlex.quote(recorded)}'
      )
      raise UserError(
          f'{where} was built from {recorded}, but data.source names {wanted}: to train on this '
          f'cache, add {fits}; to train on {wanted}, build its own cache ({hint}) '
          'in another data.cache_dir'
      )
  # The run's config.json must say how its images were resized: colorization resizes new ones so.
  if 'resize' in settings and settings['resize'] != config.data.resize:
    raise UserError(
        f'{where} was built with data.resize={settings["resize"]}, but this config has '
        f'{config.data.resize}: train on it with --config.data.resize={settings["resize"]}, or '
        f'rebuild it: {hint} --overwrite'
    )
