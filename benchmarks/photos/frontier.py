"""What colour costs in PSNR: a run's predicted ab scaled by a gain, on a cache of held-out photos.

  python benchmarks/photos/frontier.py RUN_DIR CACHE_DIR [--fit_cache TRAIN_CACHE] [--target -5]
      [--guide_run OTHER_RUN_DIR] [--fid]

Prints PSNR and colourfulness (evaluate's, per image, then averaged) of the run's colours scaled
at each pixel's own L (ab -> g * ab):
- 'gain g': one gain for every image; the row marked with the delta is the smallest reaching it;
- 'predicted colourfulness' (with --fit_cache): each image's gain set so its colourfulness is
  s times a prediction of its truth's, a ridge regression on the run's own colourfulness, L's mean
  and spread and 4 principal components of the embedding, fitted on TRAIN_CACHE (the run's
  training photos); s is the smallest reaching the delta, as for the global gain;
- 'OTHER_RUN's colourfulness' (with --guide_run): the same, from another run's colourfulness on
  the image (a colourful classification run's: it may know which photos are colourful, while its
  hues are often wrong);
- 'oracle, its true colourfulness': the same, from each image's true colourfulness: what a
  perfect prediction of it would give; 'oracle with noise': from the truth times log-normal noise
  (20 draws each, mean PSNR), what a prediction correlated r with the truth gives;
- 'oracle, best allocation': each image's gain chosen, knowing the truth, for the highest mean
  PSNR at that mean delta (an upper bound of any per-image gain; it also knows which images'
  colours are wrong, and grays them).
With --fid, the global gains' rows also give FID to the true images, on the Inception network
the cache's features came from (as `evaluate` computes it).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from colorflax import checkpoints, color, device_pipeline, distributed, features_cache  # noqa: E402
from colorflax import fid as fid_lib  # noqa: E402
from colorflax import losses, metrics  # noqa: E402
from colorflax import model as model_lib  # noqa: E402

GAINS = np.round(np.arange(0.0, 6.001, 0.05), 2)


def predictions(workdir, cache_dir):
  """(L/100, predicted ab/128, true rgb, embeddings) of every image of the cache, by the run's
  best checkpoint."""
  config = checkpoints.read_config(workdir)
  cache = features_cache.open_cache(cache_dir)
  mesh = distributed.data_mesh(jax.devices()[:1])
  model, variables, _ = checkpoints.restore_for_inference(workdir, config, 'best', mesh)
  predict = model_lib.make_predict(model, losses.objective(config))
  images, embeddings = np.asarray(cache.images[:]), np.asarray(cache.embeddings[:], np.float32)
  l_norm, _, rgb = (np.asarray(x) for x in device_pipeline.lab_batch(images, None, None, False))
  ab = np.concatenate(
      [
          predict(variables, l_norm[i : i + 16], embeddings[i : i + 16])
          for i in range(0, len(images), 16)
      ]
  )
  return l_norm, ab, rgb, embeddings.astype(np.float64)


@jax.jit
def _scored(l_norm, ab, rgb, gains):
  """PSNR and colourfulness (G, B) of each image's ab times each gain."""

  def one(g):
    rebuilt = color.lab_norm_to_rgb(l_norm, g * ab)
    return metrics.psnr(rebuilt, rgb), metrics.colorfulness(rebuilt)

  return jax.lax.map(one, gains)


def scores(workdir, cache_dir):
  """Every image's (PSNR, colourfulness) at each of GAINS (G, N), its true colourfulness (N,),
  what predicts it (the run's colourfulness at gain 1, L's mean and spread (N, 3), embeddings),
  and `render(g)`: the images as uint8 RGB at gain g."""
  l_norm, ab, rgb, embeddings = predictions(workdir, cache_dir)
  psnr, colour = (np.asarray(x, np.float64) for x in _scored(l_norm, ab, rgb, jnp.asarray(GAINS)))
  truth = np.asarray(metrics.colorfulness(jnp.asarray(rgb)), np.float64)
  own = colour[int(np.argmin(np.abs(GAINS - 1.0)))]
  stats = np.stack([np.log1p(own), l_norm.mean((1, 2, 3)), l_norm.std((1, 2, 3))], 1)
  render = lambda g: np.asarray(color.lab_norm_to_rgb(l_norm, g * ab) * 255 + 0.5).astype(np.uint8)
  return psnr, colour, truth, stats, embeddings, render


def fid_to_truth(cache_dir):
  """images (uint8 RGB) -> their FID to the cache's images, on the cache's Inception network."""
  from colorflax import inception

  cache = features_cache.open_cache(cache_dir)
  features = fid_lib.Features(*inception.load_for_cache(cache.manifest, cache.directory))
  features.add('truth', np.asarray(cache.images[:]))

  def fid(images):
    name = f'images {len(features.sets)}'
    features.add(name, images)
    return fid_lib.frechet_distance(features[name], features['truth'])

  return fid


def colourfulness_predictor(stats, embeddings, truth, components=4, ridge=10.0):
  """(stats, embeddings) -> predicted true colourfulness: a ridge regression of log(1 + M3)."""
  mean = embeddings.mean(0)
  _, s, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
  basis = vt[:components].T / (s[:components] / np.sqrt(len(embeddings)))
  design = lambda st, e: np.c_[np.ones(len(st)), st, (e - mean) @ basis]
  x = design(stats, embeddings)
  w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ np.log1p(truth))
  return lambda st, e: np.expm1(design(st, e) @ w)


def at_least(colour, targets):
  """Each image's smallest gain (its index in GAINS) whose colourfulness reaches its target, or
  the largest gain."""
  return np.array(
      [
          (np.nonzero(colour[:, i] >= t)[0][:1].tolist() or [len(GAINS) - 1])[0]
          for i, t in enumerate(targets)
      ]
  )


def following(colour, guess, reaches):
  """(each image's gain index, s): gains setting each image's colourfulness to s times its
  guess, s the smallest that reaches the delta; None if none does."""
  for s in np.arange(0.5, 3.001, 0.05):
    if reaches(pick := at_least(colour, s * guess)):
      return pick, s
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('cache_dir')
  parser.add_argument('--fit_cache', help="the run's training photos' cache, to predict from")
  parser.add_argument('--target', type=float, default=-5.0, help='mean colourfulness delta')
  parser.add_argument('--fid', action='store_true', help="also the global gains' FID")
  parser.add_argument('--guide_run', help='a run whose colourfulness on each image to follow')
  args = parser.parse_args()
  psnr, colour, truth, stats, embeddings, render = scores(args.workdir, args.cache_dir)
  fid = fid_to_truth(args.cache_dir) if args.fid else None
  n, images = len(truth), np.arange(len(truth))
  print(f'{n} images of {args.cache_dir}; truth colourfulness {truth.mean():.1f}')
  header = f'{"colours":<56}{"PSNR (dB)":>10}{"colourfulness":>15}{"delta":>8}'
  print(header + (f'{"FID":>10}' if fid else ''))

  def row(name, pick):
    c = colour[pick, images].mean()
    line = f'{name:<56}{psnr[pick, images].mean():>10.2f}{c:>15.1f}{c - truth.mean():>+8.1f}'
    if fid and len(set(pick)) == 1:  # one gain for every image
      line += f'{fid(render(GAINS[pick[0]])):>10.0f}'
    print(line)

  def reaches(pick):
    return colour[pick, images].mean() - truth.mean() >= args.target

  for g in (0.0, 1.0, 1.5, 2.0, 2.5, 3.0):
    row(f'gain {g}', np.full(n, np.argmin(np.abs(GAINS - g))))
  k = next((k for k in range(len(GAINS)) if reaches(np.full(n, k))), None)
  if k is not None:
    row(f'gain {GAINS[k]} (delta {args.target:+g})', np.full(n, k))
  # Each image's gain set so that its colourfulness is s times a guess of its truth's: predicted
  # (with --fit_cache), and the truth itself, what a perfect prediction would give.
  guesses = [('oracle, its true colourfulness', truth)]
  if args.fit_cache:
    _, _, fit_truth, fit_stats, fit_embeddings, _ = scores(args.workdir, args.fit_cache)
    predicted = colourfulness_predictor(fit_stats, fit_embeddings, fit_truth)(stats, embeddings)
    r = np.corrcoef(predicted, truth)[0, 1]
    guesses.insert(0, (f'predicted colourfulness (r {r:.2f})', predicted))
  if args.guide_run:
    guide = scores(args.guide_run, args.cache_dir)[1][int(np.argmin(np.abs(GAINS - 1.0)))]
    r = np.corrcoef(guide, truth)[0, 1]
    name = os.path.basename(os.path.normpath(args.guide_run))
    guesses.insert(-1, (f"{name}'s colourfulness (r {r:.2f})", guide))
  for name, guess in guesses:
    if (pick := following(colour, guess, reaches)) is not None:
      row(f'{name} x {pick[1]:.2f}', pick[0])
  # How good a prediction must be: the truth with noise, at correlations below 1.
  rng = np.random.default_rng(0)
  for sigma in (0.1, 0.2, 0.3, 0.5):
    draws = [truth * np.exp(sigma * rng.standard_normal(n)) for _ in range(20)]
    picks = [following(colour, d, reaches) for d in draws]
    if all(p is not None for p in picks):
      r = np.mean([np.corrcoef(d, truth)[0, 1] for d in draws])
      p = np.mean([psnr[pick, images].mean() for pick, _ in picks])
      c = np.mean([colour[pick, images].mean() for pick, _ in picks]) - truth.mean()
      print(f'{f"oracle with noise (r {r:.2f})":<56}{p:>10.2f}{c + truth.mean():>15.1f}{c:>+8.1f}')
  # The highest mean PSNR at the delta over per-image gains: a Lagrange multiplier on colour.
  for lam in np.geomspace(1e-4, 1e2, 400):
    if reaches(pick := np.argmax(psnr + lam * colour, axis=0)):
      row('oracle, best allocation', pick)
      break


if __name__ == '__main__':
  main()
