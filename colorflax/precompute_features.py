"""`python -m colorflax.precompute_features --config CFG`: every image's Inception-v3 feature,
computed once in torch and cached beside the resized image, so training never runs Inception.

Decoding and resizing run in worker processes; the main process batches the results through
Inception (CUDA when present, else every CPU core) and streams rows into the cache.
"""

import collections
import multiprocessing
import os
import sys
import time

import numpy as np

from colorflax import cli, features_cache, sources
from colorflax.errors import UserError
from colorflax.model import EMBEDDING_DIMS

_CONFIG = cli.define_config_flag()
_OVERWRITE = cli.define_bool('overwrite', False, 'Rebuild the cache even if a matching one exists.')


def requested_settings(config, source) -> dict:
  """Everything that determines the cache's contents, as asked for (before loading anything)."""
  return {
      'source': source.description,
      'ids': features_cache.fingerprint({'ids': source.ids}),
      'image_size': config.data.image_size,
      'resize': config.data.resize,
      'skip_grayscale': config.data.skip_grayscale,
      'max_image_pixels': config.data.max_image_pixels,
      'embedding_kind': config.features.kind,
      'inception_weights': config.features.inception_weights,
      'calibration_images': config.features.calibration_images,
      'seed': config.seed,
  }


def _check_existing(cache_dir, fp, settings, overwrite):
  """True if a complete cache with the same fingerprint can be reused as it is."""
  if os.path.isfile(cache_dir):
    raise UserError(f'data.cache_dir: {cache_dir} is a file, not a directory')
  if not os.path.isdir(cache_dir):
    return False
  manifest = features_cache.read_manifest(cache_dir)
  if manifest is None:
    if os.listdir(cache_dir):
      raise UserError(f'data.cache_dir: {cache_dir} exists and is not a colorflax cache; refusing to replace it')
    return False
  if overwrite:
    return False
  if manifest.get('fingerprint') == fp:
    return True
  old = manifest.get('settings', {})
  diff = [k for k in settings if old.get(k) != settings[k]]
  what = ', '.join(f'{k} {old.get(k)!r} -> {settings[k]!r}' for k in diff[:3]) or 'format'
  raise UserError(f'{cache_dir} holds a cache built with other settings ({what}); '
                  f'pass --overwrite to rebuild it or set data.cache_dir elsewhere')


def _batches(images, size):
  for i in range(0, len(images), size):
    yield images[i:i + size]


def precompute(config, overwrite=False, progress=True):
  """Builds (or reuses) the cache that `config` describes; returns its directory."""
  import torch
  from tqdm import tqdm

  from colorflax import inception

  cache_dir = os.path.abspath(os.path.expanduser(config.data.cache_dir))
  source = sources.from_config(config)
  settings = requested_settings(config, source)
  fp = features_cache.fingerprint(settings)
  if _check_existing(cache_dir, fp, settings, overwrite):
    print(f'reusing the features cache at {cache_dir} (same settings; --overwrite rebuilds it)')
    return cache_dir

  torch.set_num_threads(os.cpu_count() or 1)
  model, weights_used = inception.load_model(config.features.inception_weights, seed=config.seed)
  model = inception.to_device(model)
  needs_calibration = weights_used.startswith('random')
  print(f'inception weights: {weights_used}; features: {config.features.kind}; device: {inception.device()}')

  dim = EMBEDDING_DIMS[config.features.kind]
  writer = features_cache.CacheWriter(cache_dir, config.data.image_size, dim)
  skipped, pending, pending_ids = [], [], []
  bs = config.features.batch_size
  calibration_target = config.features.calibration_images if needs_calibration else 0

  def flush(final=False):
    nonlocal needs_calibration
    if needs_calibration and (len(pending) >= calibration_target or final) and pending:
      calibration = [inception.preprocess(np.stack(b)) for b in _batches(pending[:calibration_target], bs)]
      inception.calibrate(model, calibration)
      # Colorization must see the same network: keep its calibrated statistics with the cache.
      inception.save_batchnorm_stats(model, os.path.join(writer.tmp, inception.CALIBRATION_FILE))
      needs_calibration = False
    if needs_calibration:
      return
    while len(pending) >= bs or (final and pending):
      imgs, ids = np.stack(pending[:bs]), pending_ids[:bs]
      del pending[:bs], pending_ids[:bs]
      writer.append(imgs, inception.embed(model, inception.preprocess(imgs), config.features.kind), ids)

  workers = config.features.num_workers or os.cpu_count() or 1
  settings_for_workers = (source, config.data.image_size, config.data.resize, config.data.skip_grayscale,
                          config.data.max_image_pixels)
  n = len(source.ids)
  start = time.time()
  ctx = multiprocessing.get_context('spawn')  # no fork after torch has started its threads
  try:
    # The source (with its list of ids) goes to each worker once; tasks are index ranges. At
    # most `in_flight` ranges are outstanding: Inception is the slower side, and an unbounded
    # queue of decoded images would grow with the dataset.
    with ctx.Pool(workers, initializer=_init_worker, initargs=settings_for_workers) as pool, \
        tqdm(total=n, unit='img', disable=not progress, desc='precompute', smoothing=0.1) as bar:
      chunk, in_flight, outstanding = 16, 4 * workers, collections.deque()

      def consume(result):
        for i, image, reason in result.get():
          if reason is not None:
            skipped.append({'path': source.ids[i], 'reason': reason})
          else:
            pending.append(image)
            pending_ids.append(source.ids[i])
            flush()
          bar.update(1)
        bar.set_postfix(skipped=len(skipped), refresh=False)

      for begin in range(0, n, chunk):
        outstanding.append(pool.apply_async(_prepare_range, (begin, min(begin + chunk, n))))
        if len(outstanding) >= in_flight:
          consume(outstanding.popleft())
      while outstanding:
        consume(outstanding.popleft())
      flush(final=True)
  except BaseException:
    writer.abort()
    raise
  if writer.images.rows == 0:
    writer.abort()
    reasons = sorted({s['reason'] for s in skipped})
    raise UserError(f'data.source: none of the {n} images could be used ({"; ".join(reasons)[:200]})')

  import PIL
  manifest = {
      'source': source.description,
      'image_size': config.data.image_size,
      'resize': config.data.resize,
      'embedding_dim': dim,
      'embedding_kind': config.features.kind,
      'inception_weights': weights_used,
      'inception_calibration': inception.CALIBRATION_FILE if weights_used.startswith('random') else None,
      'skipped': skipped,
      'fingerprint': fp,
      'settings': settings,
      'versions': {**inception.versions(), 'numpy': np.__version__, 'pillow': PIL.__version__},
  }
  writer.finish(manifest)
  elapsed = time.time() - start
  n = writer.images.rows
  print(f'cached {n} images ({len(skipped)} skipped) at {config.data.image_size}px with '
        f'{config.features.kind} features [{weights_used}] in {cache_dir}: '
        f'{elapsed:.1f}s, {n / max(elapsed, 1e-9):.1f} img/s')
  return cache_dir


_WORKER_SETTINGS = None


def _init_worker(*settings):
  global _WORKER_SETTINGS
  _WORKER_SETTINGS = settings


def _prepare_range(begin, end):
  source, *rest = _WORKER_SETTINGS
  return [sources.prepare_item(source, i, *rest) for i in range(begin, end)]


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(_CONFIG)
  precompute(config, overwrite=_OVERWRITE.value, progress=sys.stderr.isatty() or True)


def entry_point():
  cli.run(main)


if __name__ == '__main__':
  entry_point()
