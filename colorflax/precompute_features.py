"""`python -m colorflax.precompute_features --config CFG`: every image's Inception-v3 feature,
computed once in torch and cached beside the resized image, so training never runs Inception.

Decoding and resizing run in worker processes; the main process batches the results through
Inception (CUDA when present, else every CPU core) and streams rows into the cache. A build
that was stopped (Ctrl-C, SIGTERM, kill -9) is continued by the same command from its last
progress record (features_cache.CacheWriter); stopped by Ctrl-C, SIGTERM or SIGHUP, it says how
many images it keeps.
"""

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import time

import numpy as np

from colorflax import cli, features_cache, reporting, sources
from colorflax.errors import UserError
from colorflax.model import EMBEDDING_DIMS

_CONFIG = cli.define_config_flag()
_OVERWRITE = cli.define_bool('overwrite', False, 'Rebuild the cache even if a matching one exists.')
_MERGE = cli.define_bool('merge', False, 'Join the finished shards (features.num_shards) into one cache.')


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


@contextlib.contextmanager
def _decode_pool(workers, settings):
  """The decode worker processes. concurrent.futures rather than multiprocessing.Pool: when a
  worker dies (SLURM's SIGTERM reaches every process of the job), Pool's terminate waits for
  ever on the queue lock the dead worker held; this pool is just broken. On the way out the
  queued tasks are dropped and the running ones finish."""
  ctx = multiprocessing.get_context('spawn')  # no fork after torch has started its threads
  cli.start_resource_tracker_without_sighup()
  # The source (with its list of ids) goes to each worker once.
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=settings)
  try:
    yield pool
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _decoded(pool, begin, end, workers):
  """(index, uint8 image or None, skip reason or None) for source rows [begin, end), in order.

  Tasks are index ranges; at most 4 per worker are outstanding: Inception is the slower side,
  and an unbounded queue of decoded images would grow with the dataset.
  """
  chunk, outstanding = 16, collections.deque()
  for lo in range(begin, end, chunk):
    outstanding.append(pool.submit(_prepare_range, lo, min(lo + chunk, end)))
    if len(outstanding) >= 4 * workers:
      yield from outstanding.popleft().result()
  while outstanding:
    yield from outstanding.popleft().result()


def shard_range(n, shard, shards):
  """The contiguous rows [begin, end) of shard `shard` of `shards`: parts concatenate in order."""
  return shard * n // shards, (shard + 1) * n // shards


def precompute(config, overwrite=False, progress=True):
  """Builds (or reuses) the cache that `config` describes — or, with features.num_shards > 1,
  its part features.shard_index — and returns the directory written."""
  import torch

  from colorflax import inception

  cache_dir = os.path.abspath(os.path.expanduser(config.data.cache_dir))
  shard, shards = config.features.shard_index, config.features.num_shards
  out_dir = cache_dir if shards == 1 else features_cache.part_dir(cache_dir, shard, shards)
  source = sources.from_config(config)
  settings = requested_settings(config, source)
  fp = features_cache.fingerprint(settings)
  if _check_existing(out_dir, fp, settings, overwrite):
    print(f'reusing the features cache at {out_dir} (same settings; --overwrite rebuilds it)')
    return out_dir

  torch.set_num_threads(os.cpu_count() or 1)
  model, weights_used = inception.load_model(config.features.inception_weights, seed=config.seed)
  model = inception.to_device(model)
  print(f'inception weights: {weights_used}; features: {config.features.kind}; device: {inception.device()}')

  dim = EMBEDDING_DIMS[config.features.kind]
  n = len(source.ids)
  begin, end = shard_range(n, shard, shards)
  # Everything the rows depend on: an interrupted build with the same key is continued.
  resume_key = {'fingerprint': fp, 'rows': [begin, end], 'inception_weights': weights_used}
  writer = features_cache.CacheWriter(out_dir, config.data.image_size, dim, expected_rows=end - begin,
                                      resume_key=resume_key)
  skipped, pending = [], []  # (source row, {'path', 'reason'}), (source row, image): in source order
  start_at = begin
  if writer.resumed:
    start_at = writer.resumed['next_index']
    skipped = [(i, entry) for i, entry in writer.resumed['skipped']]
    skipped_rows = {i for i, _ in skipped}
    writer.files = [source.ids[i] for i in range(begin, start_at) if i not in skipped_rows]
    if len(writer.files) != writer.images.rows:
      raise UserError(f'the interrupted build in {writer.tmp} does not add up ({writer.images.rows} rows for '
                      f'{len(writer.files)} images); delete it and run again')
    print(f'continuing the interrupted build in {writer.tmp}: {start_at - begin} of {end - begin} images done')
  recorded = [start_at]  # the source row the last progress record continues from
  bs = config.features.batch_size

  def flush(final=False):
    while len(pending) >= bs or (final and pending):
      rows, imgs = [i for i, _ in pending[:bs]], np.stack([image for _, image in pending[:bs]])
      del pending[:bs]
      writer.append(imgs, inception.embed(model, inception.preprocess(imgs), config.features.kind),
                    [source.ids[i] for i in rows])

  def record(next_index):
    writer.record_progress({'next_index': next_index, 'skipped': [[i, e] for i, e in skipped if i < next_index]})
    recorded[0] = next_index

  workers = config.features.num_workers or os.cpu_count() or 1
  settings_for_workers = (source, config.data.image_size, config.data.resize, config.data.skip_grayscale,
                          config.data.max_image_pixels)
  start = time.time()
  try:
    with _decode_pool(workers, settings_for_workers) as pool:
      stats = os.path.join(writer.tmp, inception.CALIBRATION_FILE)
      if weights_used.startswith('random') and writer.resumed and os.path.isfile(stats):
        model.load_state_dict(torch.load(stats, map_location='cpu', weights_only=True), strict=False)
      elif weights_used.startswith('random'):
        # Calibrate on the first usable images of the whole source, so that every shard (and a
        # single run) ends up with the same network.
        first = []
        for _, image, _ in _decoded(pool, 0, n, workers):
          if image is not None:
            first.append(image)
          if len(first) >= config.features.calibration_images:
            break
        inception.calibrate(model, [inception.preprocess(np.stack(b)) for b in _batches(first, bs)])
        # Colorization must see the same network: keep its calibrated statistics with the cache.
        with writer.writing():
          inception.save_batchnorm_stats(model, stats)
        record(start_at)  # a run stopped before its first rows keeps the calibration
      last_record = time.time()
      with reporting.progress_bar(total=end - begin, initial=start_at - begin, unit='img', disable=not progress,
                                  desc='precompute', smoothing=0.1) as bar:
        for i, image, reason in _decoded(pool, start_at, end, workers):
          if reason is not None:
            skipped.append((i, {'path': source.ids[i], 'reason': reason}))
          else:
            pending.append((i, image))
            flush()
          if time.time() - last_record >= features_cache.PROGRESS_EVERY_SECONDS:
            record(pending[0][0] if pending else i + 1)
            last_record = time.time()
          bar.update(1)
          bar.set_postfix(skipped=len(skipped), refresh=False)
      flush(final=True)
  except (KeyboardInterrupt, concurrent.futures.BrokenExecutor) as e:
    writer.keep()
    kept = f'after {recorded[0] - begin} of {end - begin} images, which are kept: run the same command again to continue'
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM / SIGHUP (cli.Stopped)
      raise cli.Interrupted(f'{kept} (or delete {writer.tmp} to start over)', e) from None
    # A decode worker was killed (out of memory?).
    raise UserError(f'a decode worker process died {kept} (fewer features.num_workers use less memory)') from None
  except BaseException:
    writer.keep()  # a full disk has deleted it already; anything else can be continued
    raise
  skipped = [entry for _, entry in skipped]
  if writer.images.rows == 0 and shards == 1:
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
  if shards > 1:
    manifest['shard'] = {'index': shard, 'count': shards, 'rows': [begin, end]}
  writer.finish(manifest)
  elapsed = time.time() - start
  print(f'cached {writer.images.rows} images ({len(skipped)} skipped) at {config.data.image_size}px with '
        f'{config.features.kind} features [{weights_used}] in {out_dir}: '
        f'{elapsed:.1f}s, {(end - start_at) / max(elapsed, 1e-9):.1f} img/s')
  if skipped:
    print(f'skipped: {skip_summary(skipped)}; each file and its reason is in {out_dir}/manifest.json')
  if shards > 1:
    print(f'shard {shard + 1} of {shards} done; when all are, join them: '
          f'python -m colorflax.precompute_features --config ... --merge')
  return out_dir


def skip_summary(skipped) -> str:
  """'3 unreadable, 1 empty file, ...': skip reasons counted by kind (the text before ':' or '(')."""
  kinds = collections.Counter(re.split(r'[:(]', s['reason'])[0].strip() for s in skipped)
  return ', '.join(f'{count} {kind}' for kind, count in kinds.most_common())


def merge(config):
  """Joins the finished parts of a sharded precompute into one cache (streamed), then removes them."""
  cache_dir = os.path.abspath(os.path.expanduser(config.data.cache_dir))
  shards = config.features.num_shards
  parts = [features_cache.part_dir(cache_dir, k, shards) for k in range(shards)]
  missing = [k for k, p in enumerate(parts) if features_cache.read_manifest(p) is None]
  if missing:
    raise UserError(f'cannot merge: shard(s) {missing} of {shards} are not finished in '
                    f'{features_cache.parts_root(cache_dir)}; run them with --config.features.shard_index=K')
  opened = [features_cache.open_cache(p) for p in parts]
  fps = {c.manifest['fingerprint'] for c in opened}
  if len(fps) != 1:
    raise UserError(f'cannot merge: the parts in {features_cache.parts_root(cache_dir)} were built with different settings')
  first = opened[0].manifest
  writer = features_cache.CacheWriter(cache_dir, first['image_size'], first['embedding_dim'],
                                      expected_rows=sum(c.num_images for c in opened))
  for cache in opened:
    for a in range(0, cache.num_images, 1024):
      b = min(a + 1024, cache.num_images)
      writer.append(cache.images[a:b], cache.embeddings[a:b], cache.manifest['files'][a:b])
  if first.get('inception_calibration'):
    with writer.writing():
      shutil.copy(os.path.join(parts[0], first['inception_calibration']), writer.tmp)
  manifest = {k: v for k, v in first.items() if k not in ('shard', 'files', 'num_images', 'format_version')}
  manifest['skipped'] = [s for c in opened for s in c.manifest['skipped']]
  writer.finish(manifest)
  shutil.rmtree(features_cache.parts_root(cache_dir))
  print(f'merged {shards} shards: {writer.images.rows} images in {cache_dir}'
        + (f' ({skip_summary(manifest["skipped"])} skipped: see its manifest.json)' if manifest['skipped'] else ''))
  return cache_dir


_WORKER_SETTINGS = None


def _init_worker(*settings):
  global _WORKER_SETTINGS
  _WORKER_SETTINGS = settings
  # A terminal's Ctrl-C and hang-up reach the decode workers too: the main process stops them
  # (the pool's shutdown), so each need not die with a traceback of its own.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _prepare_range(begin, end):
  source, *rest = _WORKER_SETTINGS
  return [sources.prepare_item(source, i, *rest) for i in range(begin, end)]


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(_CONFIG)
  if _MERGE.value:
    merge(config)
  else:
    precompute(config, overwrite=_OVERWRITE.value, progress=True)


def entry_point():
  cli.run(main)


if __name__ == '__main__':
  entry_point()
