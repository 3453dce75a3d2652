"""The objectives (colorflax.losses) and the figures the field compares: each loss trains, the
classification loss's parts do what the paper says, EMA weights are what is evaluated,
colourfulness is the literature's, FID of a set against itself is ~0."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorflax import checkpoints, fid, losses, metrics, precompute_features, train
from colorflax import model as model_lib
from colorflax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import small_config  # noqa: E402


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('cache') / 'synthetic32'
  precompute_features.precompute(small_config(d), progress=False)
  return d


def test_the_bins_are_the_grids_squares_that_touch_the_gamut():
  centres = losses.bin_centres()
  assert centres.shape == (261, 2)
  assert (np.abs(centres) <= 110).all() and (np.round(centres / 10) * 10 == centres).all()
  assert [0, 0] in centres.tolist() and [110, 110] not in centres.tolist()


def test_soft_encoding_weighs_the_nearest_bins_by_a_gaussian_of_the_distance():
  centres = jnp.asarray(
      [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0], [30.0, 30.0]]
  )
  idx, w = losses.soft_encode(jnp.asarray([[2.0, 0.0]]), centres, neighbours=5, sigma=5.0)
  assert sorted(np.asarray(idx[0]).tolist()) == [0, 1, 2, 3, 4]  # not the far one
  d2 = np.sum(np.square(np.asarray(centres)[np.asarray(idx[0])] - [2.0, 0.0]), -1)
  expected = np.exp(-d2 / 50.0)
  np.testing.assert_allclose(np.asarray(w[0]), expected / expected.sum(), rtol=1e-5)


def test_rebalancing_weights_lift_rare_colours_and_average_one_over_the_training_pixels():
  centres = np.asarray([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]])
  histogram = np.asarray([90.0, 9.0, 1.0])  # gray everywhere, a little red, one rare colour
  w = losses.class_weights(histogram, centres, sigma=5.0, mix=0.5)
  assert w[2] > w[1] > w[0]
  # By hand: the distribution smoothed (bins 0 and 1 are 10 apart: exp(-100/50) between them),
  # mixed half and half with the uniform one, inverted, scaled to an expectation of 1.
  kernel = np.exp(-np.sum(np.square(centres[:, None] - centres[None]), -1) / 50.0)
  smooth = kernel @ (histogram / 100)
  smooth /= smooth.sum()
  expected = 1 / (0.5 * smooth + 0.5 / 3)
  np.testing.assert_allclose(w, expected / np.sum(smooth * expected), rtol=1e-5)
  assert np.sum(smooth * w) == pytest.approx(1.0)
  uniform = losses.class_weights(histogram, centres, mix=1.0)  # lambda = 1: no rebalancing
  np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)


def test_the_annealed_mean_is_the_mode_when_cold_and_the_mean_at_one():
  centres = jnp.asarray([[0.0, 0.0], [50.0, 0.0], [0.0, 80.0]])
  logits = jnp.log(jnp.asarray([0.2, 0.5, 0.3]))
  np.testing.assert_allclose(losses.annealed_mean(logits, centres, 1e-3), [50.0, 0.0], atol=1e-3)
  np.testing.assert_allclose(losses.annealed_mean(logits, centres, 1.0), [25.0, 24.0], rtol=1e-5)
  warmer = losses.annealed_mean(logits, centres, 0.38)
  assert 25 < float(warmer[0]) < 50  # between the two: Zhang et al.'s vivid but safe


@pytest.mark.parametrize('name', losses.LOSSES)
def test_training_and_validation_score_a_batch_alike(name):
  # The same batch, unaugmented: the training loss (over its pixels) is the mean of validation's
  # per-image losses, whatever the objective.
  rng = np.random.default_rng(0)
  objective = losses.Objective(name=name, weights=None)
  target = jnp.asarray(rng.uniform(-0.5, 0.5, (4, 8, 8, 2)), jnp.float32)
  shape = (4, 4, 4, objective.classes) if objective.classes else (4, 8, 8, 2)
  output = jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
  batch = float(objective.batch_loss(output, target))
  assert batch == pytest.approx(float(jnp.mean(objective.per_image_loss(output, target))), rel=1e-5)
  assert batch > 0


@pytest.mark.parametrize('name', losses.LOSSES)
def test_each_loss_trains_and_lowers_its_own_validation_loss(cache_dir, tmp_path, name):
  config = small_config(cache_dir, num_epochs=3, loss=name, samples_every_epochs=0)
  state, last = train.train_and_evaluate(config, str(tmp_path / name), progress=False)
  lines = [
      json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
  ]
  assert lines[-1]['val_loss'] < lines[0]['val_loss'], [line['val_loss'] for line in lines]
  if name == 'classification':
    # The colours of the training split, counted once and kept with the cache.
    kept = [f for f in os.listdir(cache_dir) if f.startswith('ab_histogram-')]
    assert len(kept) == 1 and np.load(cache_dir / kept[0]).sum() == 36 * 16 * 16  # half res


def test_a_run_keeps_its_loss_resuming_or_evaluating_with_another_is_one_line(cache_dir, tmp_path):
  from colorflax import evaluate

  work = tmp_path / 'run'
  train.train_and_evaluate(
      small_config(cache_dir, num_epochs=1, loss='l1'), str(work), progress=False
  )
  with pytest.raises(UserError, match=r"was trained with loss='l1', this config has 'mse'"):
    train.train_and_evaluate(small_config(cache_dir, num_epochs=2), str(work), progress=False)
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.evaluate',
          f'--workdir={work}',
          '--config.loss=classification',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"evaluate.py: error: --config.loss=classification: {work} was trained with loss='l1', "
      'which its weights are for'
  ], r.stderr
  with pytest.raises(UserError, match='--temperature: the run was trained with loss=l1'):
    evaluate.evaluate(str(work), small_config(cache_dir, loss='l1'), temperature=0.5)


def test_with_ema_the_averaged_weights_are_validated_kept_and_evaluated(cache_dir, tmp_path):
  from colorflax import evaluate

  work = tmp_path / 'ema'
  config = small_config(cache_dir, num_epochs=2, ema_decay=0.5)
  state, last = train.train_and_evaluate(config, str(work), progress=False)
  leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(state.ema), leaves(state.params)))
  kept, _, _ = checkpoints.restore_model(work, 'latest')
  for a, b in zip(leaves(kept['params']), leaves(state.ema)):  # the model item: the average
    np.testing.assert_array_equal(a, b)
  summary, _, _ = evaluate.evaluate(str(work), config, 'latest', 'val')
  assert summary['psnr'] == pytest.approx(last['val_psnr'], abs=1e-3)  # validation's weights
  # Resuming restores both: the weights being trained and their average.
  resumed, _ = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3, ema_decay=0.5), str(work), progress=False
  )
  assert int(resumed.step) == 12 and resumed.ema is not None


def test_colourfulness_is_the_literatures_m3():
  rgb = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  for ours, img in zip(
      np.asarray(metrics.colorfulness(jnp.asarray(rgb))), rgb.astype(np.float64) * 255
  ):
    rg = np.abs(img[..., 0] - img[..., 1])
    yb = np.abs(0.5 * (img[..., 0] + img[..., 1]) - img[..., 2])
    expected = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(
        rg.mean() ** 2 + yb.mean() ** 2
    )
    assert ours == pytest.approx(expected, rel=1e-4)


def test_fid_of_a_set_against_itself_is_zero_and_is_the_textbook_formula():
  from scipy import linalg

  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 8))
  assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  assert fid.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # |shift|^2
  for n, d in ((400, 8), (6, 20), (50, 12)):  # more images than features, and fewer
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n + 3, d)) * 1.3 + 0.2
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    textbook = (
        np.sum(np.square(x.mean(0) - y.mean(0)))
        + np.trace(cx)
        + np.trace(cy)
        - 2 * np.trace(linalg.sqrtm(cx @ cy).real)
    )
    assert fid.frechet_distance(x, y) == pytest.approx(textbook, rel=1e-6)


def test_evaluate_reports_fid_with_the_weights_it_used(cache_dir, tmp_path):
  from colorflax import evaluate

  work = tmp_path / 'run'
  config = small_config(cache_dir, num_epochs=1, samples_every_epochs=0)
  train.train_and_evaluate(config, str(work), progress=False)
  summary, _, _ = evaluate.evaluate(str(work), config, 'best', 'val', fid=True)
  assert summary['fid_weights'].startswith('random(seed=')
  assert summary['fid'] >= 0 and summary['fid_gray'] >= 0
  assert 'FID' in evaluate.format_table(summary)


def test_predict_takes_a_temperature_per_call_without_compiling_again():
  # The demo's temperature slider: one compiled function for every value.
  objective = losses.Objective(name='classification', temperature=0.38)
  model = model_lib.Colorizer(width=0.125, classes=objective.classes)
  variables = model_lib.init_variables(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  L = jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 1)), jnp.float32)
  emb = jnp.asarray(rng.normal(0, 1, (1, 1000)), jnp.float32)
  predict = model_lib.make_predict(model, objective)
  default = predict(variables, L, emb)
  np.testing.assert_allclose(predict(variables, L, emb, None, 0.38), default, atol=1e-6)
  vivid = predict(variables, L, emb, None, 0.05)
  compiled = predict._cache_size()
  safe = predict(variables, L, emb, None, 1.0)
  assert predict._cache_size() == compiled
  # Sharper distributions move the colour away from the safe mean.
  assert float(jnp.abs(vivid - safe).max()) > 1e-3
