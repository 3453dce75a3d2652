"""Colour hints (colorflax.hints, model.hints): the hint channels start as a model without them,
training's simulated users are a function of (seed, step) and resume exactly, a hint moves the
colour around its point, and bad hints files are one line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from colorflax import checkpoints, colorize, evaluate, hints, train
from colorflax import model as model_lib
from colorflax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import _assert_same_params, small_config  # noqa: E402


def _hinted(cache_dir, **over):
  over = {'model.hints': True, 'samples_every_epochs': 0, **over}
  return small_config(cache_dir, **over)


@pytest.fixture(scope='module')
def cache_dir(small_cache):
  return small_cache  # conftest's, built once for every module that only reads it


def _batch(seed=0, b=2, size=32):
  rng = np.random.default_rng(seed)
  L = jnp.asarray(rng.uniform(0, 1, (b, size, size, 1)), jnp.float32)
  emb = jnp.asarray(rng.normal(0, 1, (b, 1000)), jnp.float32)
  ab = jnp.asarray(rng.uniform(-0.4, 0.4, (b, size, size, 2)), jnp.float32)
  return L, emb, ab


def test_without_hints_a_hints_model_is_the_seed_model_and_with_them_it_starts_at_their_colour():
  plain = model_lib.Colorizer(width=0.25)
  hinted = model_lib.Colorizer(width=0.25, hints=True)
  vp = model_lib.init_variables(plain, jax.random.key(3))
  vh = model_lib.init_variables(hinted, jax.random.key(3))
  extra = vh['params']['enc1_0'].pop('extra_kernel')  # the hint channels into enc1_0
  assert extra.shape == (3, 3, hints.CHANNELS, 32) and not np.any(extra)
  out = vh['params'].pop('hints_out')  # and to the output layer
  assert not np.any(out['kernel'])
  np.testing.assert_array_equal(out['spread_kernel'], [[1, 0], [0, 1], [0, 0]])
  # Every other weight is the seed model's, from the same key.
  jax.tree_util.tree_map(np.testing.assert_array_equal, vh, vp)
  vh['params']['enc1_0']['extra_kernel'] = extra
  vh['params']['hints_out'] = out
  L, emb, ab = _batch()
  given = hints.revealed(0, jnp.arange(2), ab, 10)
  assert float(given[..., 2].sum()) > 0
  expected = plain.apply(vp, L, emb)
  # No hints: the seed model's output (to float rounding: with hints, enc1_0 is the plain conv
  # and pool, not the one-channel form).
  np.testing.assert_allclose(hinted.apply(vh, L, emb), expected, atol=1e-6)
  # Hints: at first, their spread colour added to the ab before the output's tanh.
  spread = np.asarray(hints.spread(given))
  np.testing.assert_allclose(
      hinted.apply(vh, L, emb, hints=given),
      np.tanh(np.arctanh(np.asarray(expected)) + spread[..., :2]),
      atol=1e-5,
  )
  # Once trained (the hint weights moved), no hints is still the model's other weights alone.
  vh['params']['enc1_0']['extra_kernel'] = jnp.ones_like(extra)
  vh['params']['hints_out'] = jax.tree_util.tree_map(jnp.ones_like, out)
  np.testing.assert_allclose(hinted.apply(vh, L, emb), expected, atol=1e-6)
  with pytest.raises(ValueError, match='takes no colour hints'):
    plain.apply(vp, L, emb, hints=given)


def test_the_classification_head_starts_with_a_prior_around_the_hints_colour():
  from colorflax import losses

  model = model_lib.Colorizer(width=0.25, hints=True, classes=len(losses.bin_centres()))
  variables = model_lib.init_variables(model, jax.random.key(0))
  L, emb, _ = _batch()
  red = jnp.asarray([[[60.0, 40.0]], [[60.0, 40.0]]]) / 128
  one = jnp.ones((2, 1), jnp.int32)
  given = hints.channels(4 * one, 4 * one, 4 * one, red, one > 0, 32, 32)
  decode = losses.Objective(name='classification').decode
  before = np.asarray(decode(model.apply(variables, L, emb))) * 128
  after = np.asarray(decode(model.apply(variables, L, emb, hints=given))) * 128
  distance = lambda ab: np.linalg.norm(ab - [60.0, 40.0], axis=-1)
  assert (distance(after[:, 4:8, 4:8]) < 10).all()  # at the hint, its colour
  assert (distance(after[:, 4:8, 4:8]) < distance(before[:, 4:8, 4:8]) / 3).all()
  np.testing.assert_allclose(after[:, 28:, 28:], before[:, 28:, 28:], atol=0.5)  # not far away


def test_spread_hints_carry_their_colour_around_them_and_fade_with_the_distance():
  # Image 0: a red 3-px patch at the top left, a blue one at the bottom right; image 1: none.
  two = lambda a, b: jnp.asarray([a, b])
  given = hints.channels(
      top=two([2, 58], [0, 0]),
      left=two([2, 58], [0, 0]),
      size=two([3, 3], [1, 1]),
      ab=jnp.asarray([[[0.5, 0.3], [-0.1, -0.4]], [[0.9, 0.9], [0.9, 0.9]]]),
      valid=two([True, True], [False, False]),
      height=64,
      width=64,
  )
  spread = np.asarray(hints.spread(given))
  assert not np.any(spread[1])  # nothing without hints
  colour = lambda y, x: spread[0, y, x, :2] / spread[0, y, x, 2]
  np.testing.assert_allclose(colour(3, 3), [0.5, 0.3], atol=1e-4)
  np.testing.assert_allclose(colour(59, 59), [-0.1, -0.4], atol=1e-4)
  assert spread[0, 3, 3, 2] > 0.99  # 9 hinted pixels: confident there
  fading = spread[0, 3, [3, 12, 20, 30, 40], 2]  # along the row away from it (sigma 8 px)
  assert (np.diff(fading) < 0).all() and fading[-1] < 1e-3, fading
  np.testing.assert_allclose(colour(31, 31), [0.2, -0.05], atol=1e-3)  # halfway: the mean


def test_a_revealed_hint_is_a_square_patch_of_the_true_patchs_mean_colour():
  _, _, ab = _batch(seed=1, b=16)
  given = np.asarray(hints.revealed(7, jnp.arange(16), ab, 1))
  sides = []
  for i in range(16):
    ys, xs = np.nonzero(given[i, ..., 2])
    side = ys.max() - ys.min() + 1
    assert xs.max() - xs.min() + 1 == side and len(ys) == side * side  # a square
    sides.append(side)
    patch = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    np.testing.assert_allclose(
        given[i][patch][..., :2],
        np.broadcast_to(np.asarray(ab[i][patch]).mean((0, 1)), (side, side, 2)),
        atol=1e-6,
    )
    assert not given[i, ..., :2][given[i, ..., 2] == 0].any()  # nothing outside it
  assert 1 <= min(sides) and max(sides) <= 9 and len(set(sides)) > 3
  # Revealed hints are a function of (seed, row), not of the batch they come in.
  again = np.asarray(hints.revealed(7, jnp.arange(16)[::-1], ab[::-1], 1))
  np.testing.assert_array_equal(again[::-1], given)
  assert not np.array_equal(np.asarray(hints.revealed(8, jnp.arange(16), ab, 1)), given)


def test_training_hints_are_a_geometric_number_of_patches_and_a_function_of_the_key():
  _, _, ab = _batch(seed=2, b=8)
  key = jax.random.fold_in(jax.random.key(42), 5)  # (seed, step), as the training step's
  first = np.asarray(jax.jit(hints.simulate, static_argnums=(2, 3, 4))(key, ab, 0.125, 32, 9))
  np.testing.assert_array_equal(np.asarray(hints.simulate(key, ab, 0.125, 32, 9)), first)
  other = hints.simulate(jax.random.fold_in(jax.random.key(42), 6), ab, 0.125, 32, 9)
  assert not np.array_equal(np.asarray(other), first)
  # The number of points: P(0) = p, and the rest spread (1-px patches, so that they can be
  # counted; a few fall on one pixel).
  masks = np.asarray(hints.simulate(key, jnp.zeros((4000, 64, 64, 2)), 0.125, 32, 1)[..., 2])
  points = masks.sum((1, 2))
  assert abs((points == 0).mean() - 0.125) < 0.02
  assert 6.0 < points.mean() < 7.0 and points.max() <= 32  # the mean (1 - p) / p = 7, truncated


def test_a_hints_run_resumes_exactly(cache_dir, tmp_path):
  full, _ = train.train_and_evaluate(
      _hinted(cache_dir, num_epochs=2), str(tmp_path / 'a'), progress=False
  )
  train.train_and_evaluate(_hinted(cache_dir, num_epochs=1), str(tmp_path / 'b'), progress=False)
  resumed, _ = train.train_and_evaluate(
      _hinted(cache_dir, num_epochs=2), str(tmp_path / 'b'), progress=False
  )
  _assert_same_params(full, resumed)
  assert np.abs(np.asarray(full.params['enc1_0']['extra_kernel'])).max() > 0  # hints reached it
  # A hints workdir cannot be resumed, evaluated or started from as a model without hints.
  with pytest.raises(UserError, match='was trained with model.hints=True'):
    train.train_and_evaluate(small_config(cache_dir, num_epochs=3), str(tmp_path / 'b'))


def test_a_hint_moves_the_colour_toward_it_around_its_point_and_not_far_away(hinted_run):
  from colorflax import device_pipeline, distributed, features_cache

  work, config = hinted_run
  mesh = distributed.data_mesh()
  model, variables, _ = checkpoints.restore_for_inference(str(work), config, 'latest', mesh)
  cache = features_cache.open_cache(config.data.cache_dir)
  images = np.asarray(cache.images[:8])
  l_norm, _, _ = device_pipeline.lab_batch(images, None, None, train=False)
  emb = np.asarray(cache.embeddings[:8], np.float32)
  colour = np.asarray([0.45, -0.3], np.float32)  # a green no landscape here has
  points = np.zeros((8, 32, 32, 3), np.float32)
  points[:, 4:7, 4:7] = [*colour, 1.0]
  predict = model_lib.make_predict(model)
  moved = np.asarray(predict(variables, l_norm, emb, points) - predict(variables, l_norm, emb))
  toward = moved @ (colour / np.linalg.norm(colour))  # ab/128 moved toward the hint's colour
  near, far = toward[:, 4:7, 4:7].mean(), toward[:, 24:, 24:].mean()
  assert near > 0.05 and abs(far) < near / 10, (near, far)


def _write(path, data):
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


@pytest.mark.parametrize(
    'content, message',
    [
        ('{"points": [', 'not JSON'),
        ({'points': {'x': 1}}, 'expected {"points"'),
        ({'points': [{'x': 1, 'y': 2}]}, r'point 0: expected \{"x"'),
        ({'points': [{'x': 1, 'y': 2, 'rgb': '#12345'}]}, 'rgb must be a colour as #rrggbb'),
        ({'points': [{'x': 1, 'y': 2, 'rgb': 'red'}]}, 'rgb must be a colour as #rrggbb'),
        ({'points': [{'x': '1', 'y': 2, 'rgb': '#ff0000'}]}, 'x must be a number of pixels'),
        ({'points': [{'x': 1, 'y': True, 'rgb': '#ff0000'}]}, 'y must be a number of pixels'),
    ],
)
def test_a_bad_hints_file_is_one_line(tmp_path, content, message):
  path = _write(tmp_path / 'hints.json', content)
  with pytest.raises(UserError, match=message) as e:
    hints.read_points(path)
  assert '\n' not in str(e.value) and path in str(e.value)


def test_user_points_land_on_the_models_grid_with_their_colours_ab(tmp_path):
  points = [(0.0, 0.0, np.asarray([80.0, 67.0])), (199.0, 99.0, np.asarray([-20.0, 10.0]))]
  given = hints.points_for(points, 'a.png', (200, 100), (64, 32))  # image 200x100, grid 64x32
  assert given.shape == (1, 32, 64, 3)
  np.testing.assert_allclose(given[0, 0, 0], [80 / 128, 67 / 128, 1], atol=1e-6)
  np.testing.assert_allclose(given[0, 31, 63], [-20 / 128, 10 / 128, 1], atol=1e-6)
  assert given[0, ..., 2].sum() == 2 * hints.USER_PATCH**2
  with pytest.raises(UserError, match=r'a.png: point 1 at \(200, 5\) is outside the 200x100'):
    hints.points_for(points[:1] + [(200.0, 5.0, points[1][2])], 'a.png', (200, 100), (64, 32))
  # A colour's ab is what is used, whatever its lightness: #ff0000 and a darker red alike.
  path = _write(tmp_path / 'h.json', {'points': [{'x': 1, 'y': 1, 'rgb': '#ff0000'}]})
  ((x, y, ab),) = hints.read_points(path)
  assert (x, y) == (1.0, 1.0)
  np.testing.assert_allclose(ab, [80.1, 67.2], atol=0.2)  # sRGB red: L* 53.2, a* 80.1, b* 67.2


def test_evaluate_reveals_n_hints_and_a_model_without_hints_refuses_them(hinted_run, tmp_path):
  work, config = hinted_run
  psnr = {}
  for n in (0, 20):
    summary, _, _ = evaluate.evaluate(str(work), config, 'latest', 'val', hint_count=n)
    assert summary['hints'] == n
    psnr[n] = summary['psnr']
  assert (
      psnr[20] > psnr[0] + 0.03
  ), psnr  # the true colours it was shown help it (a little: a tiny model)
  plain = tmp_path / 'plain'
  plain_config = small_config(config.data.cache_dir, num_epochs=1, samples_every_epochs=0)
  train.train_and_evaluate(plain_config, str(plain), progress=False)
  with pytest.raises(UserError, match='--hints: .* was trained without colour hints'):
    evaluate.evaluate(str(plain), plain_config, 'latest', 'val', hint_count=5)
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.colorize',
          f'--workdir={plain}',
          f'--output={tmp_path}/o',
          f'--hints={_write(tmp_path / "h.json", {"points": []})}',
          str(tmp_path / 'in.png'),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert 'was trained without colour hints' in r.stderr and not (tmp_path / 'o').exists()


def test_colorize_follows_a_hints_file_and_a_hints_folder(hinted_run, tmp_path):
  work, config = hinted_run
  rng = np.random.default_rng(0)
  folder = tmp_path / 'in'
  folder.mkdir()
  for name in ('a', 'b'):
    gray = (rng.uniform(0, 1, (48, 80)) * 255).astype(np.uint8)
    Image.fromarray(gray).save(folder / f'{name}.png')
  green = {'points': [{'x': 10, 'y': 10, 'rgb': '#00c000'}]}
  inputs = [str(folder / 'a.png'), str(folder / 'b.png')]
  plain, _, _ = colorize.colorize(str(work), config, inputs, str(tmp_path / 'plain'), 'latest')
  hinted, failed, _ = colorize.colorize(
      str(work),
      config,
      inputs,
      str(tmp_path / 'hinted'),
      'latest',
      hints_file=_write(tmp_path / 'green.json', green),
  )
  assert len(hinted) == 2 and not failed
  for a, b in zip(sorted(plain), sorted(hinted)):
    before, after = (np.asarray(Image.open(p), np.float32) for p in (a, b))
    assert before.shape == after.shape == (48, 80, 3)
    # Greener around the point (G above R and B, more than before) than without the hint.
    greener = lambda rgb: rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2
    assert greener(after[8:13, 8:13]).mean() > greener(before[8:13, 8:13]).mean() + 2
  # --hints_dir: each input by its name; one without a file, or with a point off the image, is
  # skipped and reported.
  hints_dir = tmp_path / 'hints'
  hints_dir.mkdir()
  _write(hints_dir / 'a.json', green)
  written, failed, _ = colorize.colorize(
      str(work), config, inputs, str(tmp_path / 'by_name'), 'latest', hints_dir=str(hints_dir)
  )
  assert [os.path.basename(p) for p in written] == ['a.png']
  assert failed == [(inputs[1], f'no hints for it in {hints_dir} (a file named b.json)')]
  _write(hints_dir / 'b.json', {'points': [{'x': 80, 'y': 0, 'rgb': '#00c000'}]})
  _, failed, _ = colorize.colorize(
      str(work), config, inputs[1:], str(tmp_path / 'off'), 'latest', hints_dir=str(hints_dir)
  )
  assert failed == [
      (inputs[1], f'hints for {inputs[1]}: point 0 at (80, 0) is outside the 80x48 image')
  ]
