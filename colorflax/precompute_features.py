"""`python -m colorflax.precompute_features --config CFG`: every image's Inception-v3 feature,
computed once in torch and cached beside the resized image, so training never runs Inception.

Decoding and resizing run in worker processes; the main process batches the results through
Inception (CUDA when present, else every CPU core) and streams rows into the cache. A build
that was stopped (Ctrl-C, SIGTERM, kill -9) is continued by the same command from its last
progress record (cache_writer.CacheWriter); stopped by Ctrl-C, SIGTERM or SIGHUP, it says how
many images it keeps.
"""

import collections
import concurrent.futures
import os
import re
import shutil
import time

import numpy as np

from absl import flags as absl_flags

from colorflax import cache_writer, cli, decoding, features_cache, reporting, signals, sources
from colorflax.errors import UserError
from colorflax.model import EMBEDDING_DIMS


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
  """True if a complete cache with the same fingerprint can be reused as it is; False if one is
  to be built there. A folder with anything in it but a cache's own files is never replaced."""
  if os.path.isfile(cache_dir):
    raise UserError(f'data.cache_dir: {cache_dir} is a file, not a directory')
  if not os.path.isdir(cache_dir) or not os.listdir(cache_dir):
    return False
  try:
    manifest, damaged = features_cache.read_manifest(cache_dir), None
  except features_cache.DamagedCache as e:
    manifest, damaged = None, str(e)
  foreign = features_cache.foreign_files(cache_dir)
  if manifest is None and not damaged:
    raise UserError(
        f'data.cache_dir: {cache_dir} exists and is not a colorflax cache; refusing to replace it'
    )
  if (overwrite or damaged) and foreign:
    raise UserError(
        f"data.cache_dir: {cache_dir} holds files that are not the cache's "
        f'({", ".join(foreign[:3])}); refusing to replace it: set data.cache_dir elsewhere'
    )
  if overwrite:
    return False
  if damaged:
    raise UserError(f'{damaged}; pass --overwrite to rebuild it')
  if manifest.get('fingerprint') == fp:  # the same settings: reused if its arrays are whole
    features_cache.open_cache(cache_dir, rebuild='pass --overwrite to rebuild it')
    return True
  old = manifest.get('settings', {})
  diff = [k for k in settings if old.get(k) != settings[k]]
  what = ', '.join(f'{k} {old.get(k)!r} -> {settings[k]!r}' for k in diff[:3]) or 'format'
  raise UserError(
      f'{cache_dir} holds a cache built with other settings ({what}); '
      f'pass --overwrite to rebuild it or set data.cache_dir elsewhere'
  )


def _batches(images, size):
  for i in range(0, len(images), size):
    yield images[i : i + size]


def shard_range(n, shard, shards):
  """The contiguous rows [begin, end) of shard `shard` of `shards`: parts concatenate in order."""
  return shard * n // shards, (shard + 1) * n // shards


class _Build:
  """One build of a cache (or of a shard's part): the source's rows [begin, end) decoded by the
  worker pool, batched through Inception into the writer in source order, with a progress
  record every few seconds so that a stopped build continues."""

  def __init__(self, config, source, model, weights_used, writer, begin, end):
    self.config, self.source, self.model, self.weights_used = config, source, model, weights_used
    self.writer, self.begin, self.end = writer, begin, end
    # (source row, {'path', 'reason'}) and (source row, image), each in source order.
    self.skipped, self.pending = [], []
    self.start_at = begin
    if writer.resumed:
      self._continue(writer.resumed)
    self.recorded = self.start_at  # the source row the last progress record continues from
    self.workers = config.features.num_workers or os.cpu_count() or 1

  def _continue(self, resumed):
    """Picks up the interrupted build the writer found (its last progress record)."""
    self.start_at = resumed['next_index']
    self.skipped = [(i, entry) for i, entry in resumed['skipped']]
    skipped_rows = {i for i, _ in self.skipped}
    ids, writer = self.source.ids, self.writer
    writer.files = [ids[i] for i in range(self.begin, self.start_at) if i not in skipped_rows]
    if len(writer.files) != writer.images.rows:
      raise UserError(
          f'the interrupted build in {writer.tmp} does not add up ({writer.images.rows} '
          f'rows for {len(writer.files)} images); delete it and run again'
      )
    print(
        f'continuing the interrupted build in {writer.tmp}: {self.start_at - self.begin} of '
        f'{self.end - self.begin} images done'
    )

  def flush(self, final=False):
    """Embeds the decoded images waiting, in whole batches (and the rest when `final`)."""
    from colorflax import inception

    bs = self.config.features.batch_size
    while len(self.pending) >= bs or (final and self.pending):
      rows = [i for i, _ in self.pending[:bs]]
      images = np.stack([image for _, image in self.pending[:bs]])
      del self.pending[:bs]
      embeddings = inception.embed(
          self.model, inception.preprocess(images), self.config.features.kind
      )
      self.writer.append(images, embeddings, [self.source.ids[i] for i in rows])

  def record(self, next_index):
    skipped = [[i, e] for i, e in self.skipped if i < next_index]
    self.writer.record_progress({'next_index': next_index, 'skipped': skipped})
    self.recorded = next_index

  def calibrate(self, pool):
    """Random weights: their BatchNorm statistics, calibrated on the first usable images of the
    whole source, so that every shard (and a single run) ends up with the same network; kept
    with the cache, for colorization (and for a continued build)."""
    import torch

    from colorflax import inception

    stats = os.path.join(self.writer.tmp, inception.CALIBRATION_FILE)
    if self.writer.resumed and os.path.isfile(stats):
      self.model.load_state_dict(
          torch.load(stats, map_location='cpu', weights_only=True), strict=False
      )
      return
    first = []
    for _, image, _ in decoding.decoded(pool, 0, len(self.source.ids), self.workers):
      if image is not None:
        first.append(image)
      if len(first) >= self.config.features.calibration_images:
        break
    batches = _batches(first, self.config.features.batch_size)
    inception.calibrate(self.model, [inception.preprocess(np.stack(b)) for b in batches])
    with self.writer.writing():
      inception.save_batchnorm_stats(self.model, stats)
    self.record(self.start_at)  # a run stopped before its first rows keeps the calibration

  def rows(self, pool, progress):
    """Decodes and embeds rows [start_at, end) into the writer."""
    last_record = time.time()
    with reporting.progress_bar(
        total=self.end - self.begin,
        initial=self.start_at - self.begin,
        unit='img',
        disable=not progress,
        desc='precompute',
        smoothing=0.1,
    ) as bar:
      for i, image, reason in decoding.decoded(pool, self.start_at, self.end, self.workers):
        if reason is not None:
          self.skipped.append((i, {'path': self.source.ids[i], 'reason': reason}))
        else:
          self.pending.append((i, image))
          self.flush()
        if time.time() - last_record >= features_cache.PROGRESS_EVERY_SECONDS:
          self.record(self.pending[0][0] if self.pending else i + 1)
          last_record = time.time()
        bar.update(1)
        bar.set_postfix(skipped=len(self.skipped), refresh=False)
    self.flush(final=True)

  def run(self, progress):
    """The whole build; stopped (a signal, a dead worker), the rows recorded are kept."""
    config = self.config
    settings = (
        self.source,
        config.data.image_size,
        config.data.resize,
        config.data.skip_grayscale,
        config.data.max_image_pixels,
    )
    try:
      with decoding.pool(self.workers, settings) as pool:
        if self.weights_used.startswith('random'):
          self.calibrate(pool)
        self.rows(pool, progress)
    except (KeyboardInterrupt, concurrent.futures.BrokenExecutor) as e:
      self.writer.keep()
      kept = (
          f'after {self.recorded - self.begin} of {self.end - self.begin} images, which are '
          f'kept: run the same command again to continue'
      )
      if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM / SIGHUP (signals.Stopped)
        raise signals.Interrupted(
            f'{kept} (or delete {self.writer.tmp} to start over)', e
        ) from None
      # A decode worker was killed (out of memory?).
      raise UserError(
          f'a decode worker process died {kept} (fewer features.num_workers use less memory)'
      ) from None
    except BaseException:
      self.writer.keep()  # a full disk has deleted it already; anything else can be continued
      raise
    return [entry for _, entry in self.skipped]


def _manifest(config, source, settings, weights_used, skipped):
  import PIL

  from colorflax import inception

  return {
      'source': source.description,
      'image_size': config.data.image_size,
      'resize': config.data.resize,
      'embedding_dim': EMBEDDING_DIMS[config.features.kind],
      'embedding_kind': config.features.kind,
      'inception_weights': weights_used,
      'inception_calibration': (
          inception.CALIBRATION_FILE if weights_used.startswith('random') else None
      ),
      'skipped': skipped,
      'fingerprint': features_cache.fingerprint(settings),
      'settings': settings,
      'versions': {**inception.versions(), 'numpy': np.__version__, 'pillow': PIL.__version__},
  }


def _load_inception(config):
  """(Inception-v3 on the device, a description of its weights), as config.features asks."""
  import torch

  from colorflax import inception

  torch.set_num_threads(os.cpu_count() or 1)
  model, weights_used = inception.load_model(config.features.inception_weights, seed=config.seed)
  print(
      f'inception weights: {weights_used}; features: {config.features.kind}; '
      f'device: {inception.device()}'
  )
  return inception.to_device(model), weights_used


def _report(config, out_dir, build, skipped, elapsed):
  """What a finished build prints."""
  rate = (build.end - build.start_at) / max(elapsed, 1e-9)
  print(
      f'cached {build.writer.images.rows} images ({len(skipped)} skipped) at '
      f'{config.data.image_size}px with {config.features.kind} features [{build.weights_used}] '
      f'in {out_dir}: {elapsed:.1f}s, {rate:.1f} img/s'
  )
  if skipped:
    print(
        f'skipped: {skip_summary(skipped)}; each file and its reason is in {out_dir}/manifest.json'
    )
  shard, shards = config.features.shard_index, config.features.num_shards
  if shards > 1:
    print(
        f'shard {shard + 1} of {shards} done; when all are, join them: '
        f'python -m colorflax.precompute_features --config ... --merge'
    )


def precompute(config, overwrite=False, progress=True):
  """Builds (or reuses) the cache that `config` describes — or, with features.num_shards > 1,
  its part features.shard_index — and returns the directory written. One build at a time."""
  cache_dir = os.path.abspath(os.path.expanduser(config.data.cache_dir))
  shard, shards = config.features.shard_index, config.features.num_shards
  out_dir = cache_dir if shards == 1 else features_cache.part_dir(cache_dir, shard, shards)
  with features_cache.lock(out_dir):
    return _build(config, out_dir, overwrite, progress)


def _build(config, out_dir, overwrite, progress):
  shard, shards = config.features.shard_index, config.features.num_shards
  source = sources.from_config(config)
  settings = requested_settings(config, source)
  fp = features_cache.fingerprint(settings)
  if _check_existing(out_dir, fp, settings, overwrite):
    print(f'reusing the features cache at {out_dir} (same settings; --overwrite rebuilds it)')
    return out_dir
  model, weights_used = _load_inception(config)
  n = len(source.ids)
  begin, end = shard_range(n, shard, shards)
  # Everything the rows depend on: an interrupted build with the same key is continued.
  resume_key = {'fingerprint': fp, 'rows': [begin, end], 'inception_weights': weights_used}
  dim = EMBEDDING_DIMS[config.features.kind]
  writer = cache_writer.CacheWriter(
      out_dir, config.data.image_size, dim, expected_rows=end - begin, resume_key=resume_key
  )
  build = _Build(config, source, model, weights_used, writer, begin, end)
  start = time.time()
  skipped = build.run(progress)
  if writer.images.rows == 0 and shards == 1:
    writer.abort()
    reasons = '; '.join(sorted({s['reason'] for s in skipped}))
    raise UserError(f'data.source: none of the {n} images could be used ({reasons[:200]})')
  manifest = _manifest(config, source, settings, weights_used, skipped)
  if shards > 1:
    manifest['shard'] = {'index': shard, 'count': shards, 'rows': [begin, end]}
  writer.finish(manifest)
  signals.work_done()  # the cache is complete
  _report(config, out_dir, build, skipped, time.time() - start)
  return out_dir


def skip_summary(skipped) -> str:
  """'3 unreadable, 1 empty file, ...': skip reasons counted by kind (the text before ':' or
  '(')."""
  kinds = collections.Counter(re.split(r'[:(]', s['reason'])[0].strip() for s in skipped)
  return ', '.join(f'{count} {kind}' for kind, count in kinds.most_common())


def merge(config):
  """Joins the finished parts of a sharded precompute into one cache (streamed), then removes
  them."""
  with features_cache.lock(config.data.cache_dir):
    return _merge(config)


def _merge(config):
  cache_dir = os.path.abspath(os.path.expanduser(config.data.cache_dir))
  shards = config.features.num_shards
  parts = [features_cache.part_dir(cache_dir, k, shards) for k in range(shards)]
  missing = [k for k, p in enumerate(parts) if not features_cache.finished(p)]
  if missing:
    raise UserError(
        f'cannot merge: shard(s) {missing} of {shards} are not finished in '
        f'{features_cache.parts_root(cache_dir)}; run them with --config.features.shard_index=K'
    )
  opened = [features_cache.open_cache(p) for p in parts]
  fps = {c.manifest['fingerprint'] for c in opened}
  if len(fps) != 1:
    raise UserError(
        f'cannot merge: the parts in {features_cache.parts_root(cache_dir)} were built with '
        'different settings'
    )
  first = opened[0].manifest
  writer = cache_writer.CacheWriter(
      cache_dir,
      first['image_size'],
      first['embedding_dim'],
      expected_rows=sum(c.num_images for c in opened),
  )
  for cache in opened:
    for a in range(0, cache.num_images, 1024):
      b = min(a + 1024, cache.num_images)
      writer.append(cache.images[a:b], cache.embeddings[a:b], cache.manifest['files'][a:b])
  if first.get('inception_calibration'):
    with writer.writing():
      shutil.copy(os.path.join(parts[0], first['inception_calibration']), writer.tmp)
  manifest = {
      k: v for k, v in first.items() if k not in ('shard', 'files', 'num_images', 'format_version')
  }
  manifest['skipped'] = [s for c in opened for s in c.manifest['skipped']]
  writer.finish(manifest)
  shutil.rmtree(features_cache.parts_root(cache_dir))
  print(
      f'merged {shards} shards: {writer.images.rows} images in {cache_dir}'
      + (
          f' ({skip_summary(manifest["skipped"])} skipped: see its manifest.json)'
          if manifest['skipped']
          else ''
      )
  )
  return cache_dir


def define_flags(flags):
  cli.define_config(flags)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_bool(
      'overwrite', False, 'Rebuild the cache even if a matching one exists.', **define
  )
  absl_flags.DEFINE_bool(
      'merge', False, 'Join the finished shards (features.num_shards) into one cache.', **define
  )


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_config(flags)
  if flags.merge:
    merge(config)
  else:
    precompute(config, overwrite=flags.overwrite, progress=True)


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
