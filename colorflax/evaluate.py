"""`python -m colorflax.evaluate --workdir DIR`: metrics of a checkpoint, model vs grayscale.

Every metric is computed for the model's colorization *and* for the grayscale baseline
(a = b = 0), over RGB images rebuilt from each image's own L and the predicted ab:
mse (normalised ab), psnr (mean, std), ssim, colourfulness (Hasler–Süsstrunk) of predictions
and of the ground truth, and the AuC of the per-pixel ab error curve (thresholds 0-150).
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags

from colorflax import checkpoints, cli, color, device_pipeline, distributed, features_cache, files
from colorflax import fid as fid_lib
from colorflax import hints, losses
from colorflax import model as model_lib
from colorflax import reporting, signals
from colorflax.errors import UserError

SPLITS = ('val', 'train', 'all')


def per_image_metrics(model, objective=None, with_images=False, hint_count=0, seed=0):
  """jit(variables, images uint8 (B,S,S,3), embeddings, rows (B,)) -> dict of per-image metrics
  (B,), and with `with_images` the colorized and grayscale images as uint8 RGB ('images',
  'images_gray'). `hint_count`: patches of the true colour each image reveals to a model with
  hints, a function of (`seed`, its cache row)."""
  objective = objective or losses.Objective()

  def fn(variables, images, embeddings, rows):
    l_norm, ab_norm, rgb = device_pipeline.lab_batch(images, None, None, train=False)
    given = hints.revealed(seed, rows, ab_norm, hint_count) if model.hints else None
    output = model.apply(variables, l_norm, embeddings, train=False, hints=given)
    pred = objective.decode(output)
    out = losses.image_metrics(pred, l_norm, ab_norm, rgb, full=True)
    if with_images:
      as_uint8 = lambda ab: (color.lab_norm_to_rgb(l_norm, ab) * 255 + 0.5).astype(jnp.uint8)
      out.update(images=as_uint8(pred), images_gray=as_uint8(jnp.zeros_like(pred)))
    return out

  return jax.jit(fn)


# What evaluate reports per image (losses.image_metrics, full), model and grayscale baseline.
METRICS = (
    'mse',
    'mse_gray',
    'psnr',
    'psnr_gray',
    'ssim',
    'ssim_gray',
    'auc',
    'auc_gray',
    'colorfulness',
    'colorfulness_gray',
    'colorfulness_true',
)


def summarize(per_image: dict) -> dict:
  m = {k: np.asarray(v, np.float64) for k, v in per_image.items()}
  out = {'num_images': int(len(m['mse']))}
  for key in METRICS:
    out[key] = float(m[key].mean())
  out['psnr_std'] = float(m['psnr'].std())
  out['psnr_gray_std'] = float(m['psnr_gray'].std())
  out['delta_colorfulness'] = out['colorfulness'] - out['colorfulness_true']
  return out


def split_rows(cache, config, split):
  train_rows, val_rows = device_pipeline.split_indices(
      cache.num_images, config.data.val_fraction, config.seed
  )
  if split == 'val':
    return val_rows
  if split == 'train':
    return train_rows
  if split == 'all':
    return np.arange(cache.num_images)
  raise UserError(f'--split must be one of {SPLITS}, got {split!r}')


def evaluate(
    workdir,
    config,
    which='best',
    split='val',
    batch_size=None,
    samples=0,
    temperature=None,
    fid=False,
    hint_count=None,
):
  """(metrics dict, sample grid or None, per-image metrics) for a checkpoint of `workdir` on
  `config`'s cache; the per-image metrics are arrays in the order of their `row` in the cache.
  `temperature`: the classification loss's annealed mean (None: the config's). `fid`: also the
  Fréchet Inception Distance of the colorized and of the grayscale images to the true ones.
  `hint_count`: colour hints revealed per image to a model with hints (None: 0)."""
  cache = features_cache.open_cache(config.data.cache_dir)
  features_cache.check_matches_config(cache, config, size_is_a_choice=True)
  objective = losses.objective(config, temperature=temperature)
  devices = jax.devices()
  mesh = distributed.data_mesh(devices)
  model, variables, step = checkpoints.restore_for_inference(workdir, config, which, mesh)
  if hint_count:
    hints.require(model, workdir)
  rows = split_rows(cache, config, split)
  # As training's validation: eval_batch_size, else the training batch; rounded up to split
  # evenly over this machine's devices, which need not be the training run's.
  batch = batch_size or config.eval_batch_size or config.batch_size
  batch = -(-batch // len(devices)) * len(devices)
  fn = per_image_metrics(model, objective, fid, hint_count or 0, config.seed)
  features = _fid_features(config, cache) if fid else None
  per_image = _per_image(fn, variables, cache, rows, batch, mesh, features)
  summary = summarize(per_image)
  summary.update(checkpoint_step=int(step), split=split, workdir=os.path.abspath(workdir))
  if model.hints:
    summary['hints'] = hint_count or 0
  if features is not None:
    summary.update(
        fid=fid_lib.frechet_distance(features['model'], features['truth']),
        fid_gray=fid_lib.frechet_distance(features['gray'], features['truth']),
        fid_weights=features.weights,
    )
  grid = None
  if samples:
    grid = reporting.sample_grid(
        model_lib.make_predict(model, objective),
        variables,
        cache.images[rows[:samples]],
        cache.embeddings[rows[:samples]],
    )
  return summary, grid, per_image


def _fid_features(config, cache):
  """fid.Features with the Inception network the cache's features came from."""
  from colorflax import inception

  return fid_lib.Features(*inception.load_for_cache(cache.manifest, cache.directory))


def _per_image(fn, variables, cache, rows, batch, mesh, features):
  """`fn`'s per-image metrics of the cache's `rows`, batch by batch (and their images added to
  `features` for FID), with their `row`."""
  sharded = distributed.batch_sharding(mesh)
  results, in_flight = [], device_pipeline.InFlight()
  for start in reporting.progress_bar(
      range(0, len(rows), batch), desc='evaluate', unit='batch', leave=False
  ):
    chunk = rows[start : start + batch]
    n = len(chunk)
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n)])  # static shapes
    images = jax.device_put(np.asarray(cache.images[padded]), sharded)
    embeddings = jax.device_put(np.asarray(cache.embeddings[padded], np.float32), sharded)
    out = fn(variables, images, embeddings, jax.device_put(padded.astype(np.int32), sharded))
    if features is not None:  # a transfer per batch: FID's Inception runs on the host
      features.add('model', np.asarray(out.pop('images'))[:n])
      features.add('gray', np.asarray(out.pop('images_gray'))[:n])
      features.add('truth', np.asarray(cache.images[chunk]))
    results.append((n, out))  # fetched after the loop, without a transfer per batch
    in_flight.add(out)
  per_image = {}
  for n, out in results:
    for k, v in jax.device_get(out).items():
      per_image.setdefault(k, []).append(np.asarray(v)[:n])
  return {'row': np.asarray(rows), **{k: np.concatenate(v) for k, v in per_image.items()}}


def write_per_image_csv(f, per_image, names):
  """One line per image: its cache row, its source file (the manifest's id), and its metrics."""
  out = csv.writer(f)
  out.writerow(('row', 'file') + METRICS)
  for i, row in enumerate(per_image['row']):
    values = [f'{float(per_image[k][i]):.6g}' for k in METRICS]
    out.writerow([int(row), names[row]] + values)


def format_table(m):
  rows = [
      ('MSE (ab/128)', m['mse'], m['mse_gray'], '{:.5f}'),
      ('PSNR (dB)', m['psnr'], m['psnr_gray'], '{:.2f}'),
      ('SSIM', m['ssim'], m['ssim_gray'], '{:.4f}'),
      ('AuC ab error 0-150', m['auc'], m['auc_gray'], '{:.4f}'),
      ('colourfulness', m['colorfulness'], m['colorfulness_gray'], '{:.2f}'),
  ]
  if 'fid' in m:
    rows.append(('FID', m['fid'], m['fid_gray'], '{:.2f}'))
  hinted = f", {m['hints']} colour hints each" if 'hints' in m else ''
  lines = [
      f"checkpoint step {m['checkpoint_step']}, {m['num_images']} {m['split']} images{hinted}",
      f"{'metric':<22}{'model':>10}{'grayscale':>12}",
  ]
  lines += [f'{name:<22}{fmt.format(a):>10}{fmt.format(b):>12}' for name, a, b, fmt in rows]
  lines.append(
      f"{'colourfulness (truth)':<22}{m['colorfulness_true']:>10.2f}   "
      f"delta {m['delta_colorfulness']:+.2f}"
  )
  if 'fid_weights' in m:
    lines.append(f"FID on Inception-v3 pool features, weights {m['fid_weights']}")
  return '\n'.join(lines)


def define_flags(flags):
  cli.define_workdir(flags)
  define = dict(flag_values=flags)
  absl_flags.DEFINE_string(
      'split', 'val', "'val' (the training run's held-out split), 'train' or 'all'.", **define
  )
  absl_flags.DEFINE_string('json', None, 'Also write the metrics to this JSON file.', **define)
  absl_flags.DEFINE_integer(
      'samples',
      0,
      'Write a grid of N images: grayscale | predicted | actual.',
      lower_bound=0,
      **define,
  )
  absl_flags.DEFINE_string(
      'per_image',
      None,
      "Also write every image's metrics to this CSV file "
      '(its cache row and source file first), e.g. to find the worst ones.',
      **define,
  )
  cli.define_temperature(flags)
  absl_flags.DEFINE_bool(
      'fid',
      True,
      'Also the Fréchet Inception Distance of the colorized and of the grayscale images to the '
      "true ones (Inception-v3 in torch, on the run's features' weights).",
      **define,
  )
  absl_flags.DEFINE_integer(
      'hints',
      None,
      'A model trained with colour hints (model.hints): reveal N patches of the true colour per '
      'image (seeded: the same for every run), as a user would give them; none by default.',
      lower_bound=0,
      **define,
  )


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.load_workdir_config(flags)
  # Every output is checked before the work, so that none fails after it.
  json_path = cli.output_file(flags.json, 'json')
  csv_path = cli.output_file(flags.per_image, 'per_image')
  for path, flag in ((json_path, 'json'), (csv_path, 'per_image')):
    if path:
      files.check_writable(os.path.dirname(path), flag)
  samples_dir = os.path.join(flags.workdir, 'samples')
  if flags.samples:
    files.create_folder(samples_dir, 'samples')
    files.check_writable(samples_dir, 'samples')
  summary, grid, per_image = evaluate(
      flags.workdir,
      config,
      flags.checkpoint,
      flags.split,
      samples=flags.samples,
      temperature=flags.temperature,
      fid=flags.fid,
      hint_count=flags.hints,
  )
  written = []
  if json_path:
    with files.atomic(json_path) as f:
      json.dump(summary, f, indent=2)
  if csv_path:
    names = features_cache.read_manifest(config.data.cache_dir)['files']
    with files.atomic(csv_path, newline='') as f:
      write_per_image_csv(f, per_image, names)
    written.append(f'per-image metrics: {csv_path}')
  if grid is not None:
    from PIL import Image

    path = os.path.join(samples_dir, f'eval_step_{summary["checkpoint_step"]:07d}.png')
    with files.atomic(path, 'wb') as f:
      Image.fromarray(grid).save(f, format='PNG')
    written.append(f'samples: {path}')
  signals.work_done()  # every output is written
  print('\n'.join([format_table(summary)] + written))


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
