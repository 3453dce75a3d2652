import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color as skcolor
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from colorflax import (
    checkpoints,
    color,
    colorize,
    colorizer,
    evaluate,
    features_cache,
    image_io,
    metrics,
    precompute_features,
    signals,
    synthetic,
    train,
)
from colorflax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import slowed_down, small_config  # noqa: E402


def _photos(size=96):
  out = []
  for name in ('astronaut', 'coffee', 'chelsea'):
    img = Image.fromarray(getattr(skdata, name)()).resize((size, size), Image.Resampling.BOX)
    out.append(np.asarray(img, np.float32) / 255.0)
  return np.stack(out)


def test_psnr_and_ssim_match_scikit_image():
  truth = _photos()
  noisy = np.clip(truth + np.random.default_rng(0).normal(0, 0.05, truth.shape), 0, 1).astype(
      np.float32
  )
  ours_psnr = np.asarray(metrics.psnr(jnp.asarray(noisy), jnp.asarray(truth)))
  ours_ssim = np.asarray(metrics.ssim(jnp.asarray(noisy), jnp.asarray(truth)))
  for i in range(len(truth)):
    assert ours_psnr[i] == pytest.approx(
        peak_signal_noise_ratio(truth[i], noisy[i], data_range=1.0), abs=1e-3
    )
    ref = structural_similarity(
        truth[i],
        noisy[i],
        data_range=1.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ours_ssim[i] == pytest.approx(ref, abs=2e-3)


def test_colorfulness_matches_direct_numpy():
  photos = _photos()
  ours = np.asarray(metrics.colorfulness(jnp.asarray(photos)))
  for i, img in enumerate(photos.astype(np.float64) * 255):
    rg = np.abs(img[..., 0] - img[..., 1])  # the literature's M3: absolute opponent channels
    yb = np.abs(0.5 * (img[..., 0] + img[..., 1]) - img[..., 2])
    ref = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert ours[i] == pytest.approx(ref, rel=1e-4)
  gray = np.repeat(photos.mean(-1, keepdims=True), 3, -1)
  assert np.allclose(np.asarray(metrics.colorfulness(jnp.asarray(gray))), 0, atol=1e-3)


def test_colorize_run_again_into_a_folder_inside_its_input(trained, tmp_path):
  # `--output photos/colorized photos`, twice: the second run must not take the first one's
  # outputs for inputs (they would fail as "would overwrite an input" and nest a level deeper).
  root, config = trained
  for case, subfolder in (
      ('inside', 'colorized'),
      ('itself', ''),
  ):  # the output folder: inside the input, or it
    (tmp_path / case).mkdir()
    inputs = _inputs(tmp_path / case / 'in')
    output = inputs / subfolder
    for _ in range(2):
      written, failed, _ = colorize.colorize(
          str(root / 'run'), config, [str(inputs)], str(output), progress=False
      )
      assert sorted(os.path.relpath(p, output) for p in written) == [
          'in/odd_landscape.png',
          'in/portrait_gray.png',
      ]
      assert [os.path.basename(p) for p, _ in failed] == ['broken.jpg']
    _assert_colorized(inputs, output / 'in')
    assert sorted(str(p.relative_to(output)) for p in output.rglob('*.png')) == [
        'in/odd_landscape.png',
        'in/portrait_gray.png',
    ] + (['portrait_gray.png'] if output == inputs else [])


def test_auc_of_ab_error_curve():
  lab = skcolor.rgb2lab(_photos()).astype(np.float32)
  ab = lab[..., 1:]
  assert np.allclose(np.asarray(metrics.ab_error_auc(jnp.asarray(ab), jnp.asarray(ab))), 1.0)
  shifted = ab + np.array(
      [30.3, 40.4], np.float32
  )  # every pixel 50.5 units off: within t iff t >= 51
  trapezoid = (
      getattr(np, 'trapezoid', None) or np.trapz
  )  # numpy 1.26 (the oldest supported) has trapz only
  expected = trapezoid((np.arange(151) >= 51).astype(float), np.arange(151)) / 150
  assert np.allclose(
      np.asarray(metrics.ab_error_auc(jnp.asarray(shifted), jnp.asarray(ab))), expected, atol=1e-6
  )


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('trained')
  cache = root / 'cache'
  config = small_config(cache, num_epochs=3)
  precompute_features.precompute(config, progress=False)
  train.train_and_evaluate(config, str(root / 'run'), progress=False)
  return root, config


def test_evaluate_reports_model_and_baseline(trained):
  root, config = trained
  summary, grid, per_image = evaluate.evaluate(str(root / 'run'), config, 'best', 'val', samples=3)
  for key in (
      'num_images',
      'mse',
      'psnr',
      'psnr_gray',
      'ssim',
      'ssim_gray',
      'colorfulness',
      'colorfulness_true',
      'delta_colorfulness',
      'auc',
      'auc_gray',
      'checkpoint_step',
  ):
    assert key in summary
  assert summary['num_images'] == 12
  assert summary['colorfulness_gray'] == pytest.approx(
      0.0, abs=0.01
  )  # float32 Lab->RGB; real images: 10-100
  last = json.loads((root / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
  best = checkpoints.manager(root / 'run', read_only=True).best_step()
  assert summary['checkpoint_step'] == best
  if best == last['step']:  # the same split, the same numbers as training's validation
    assert summary['psnr'] == pytest.approx(last['val_psnr'], abs=1e-3)
    assert summary['psnr_gray'] == pytest.approx(last['val_psnr_gray'], abs=1e-3)
  assert grid.shape == (3 * 32, 3 * 32, 3)
  cache = features_cache.open_cache(config.data.cache_dir)
  np.testing.assert_array_equal(per_image['row'], evaluate.split_rows(cache, config, 'val'))
  everything, _, all_images = evaluate.evaluate(str(root / 'run'), config, 'best', 'all')
  assert everything['num_images'] == 48
  np.testing.assert_array_equal(all_images['row'], np.arange(48))
  for key in evaluate.METRICS:  # an image's metrics do not depend on the batch it was in
    np.testing.assert_allclose(
        all_images[key][per_image['row']], per_image[key], rtol=1e-5, atol=1e-6
    )


def test_evaluate_cli_restores_on_one_device(trained, tmp_path):
  root, config = trained
  out = tmp_path / 'm.json'
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.evaluate',
          f'--workdir={root}/run',
          '--checkpoint=latest',
          f'--json={out}',
          '--samples=2',
          f'--per_image={tmp_path}/per_image.csv',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, 'XLA_FLAGS': ''},
  )  # trained on 4 devices, restored onto 1
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(out.read_text())
  assert summary['num_images'] == 12
  with open(tmp_path / 'per_image.csv', newline='') as f:
    lines = list(csv.DictReader(f))
  cache = features_cache.open_cache(config.data.cache_dir)
  assert [int(x['row']) for x in lines] == evaluate.split_rows(cache, config, 'val').tolist()
  assert [x['file'] for x in lines] == [cache.manifest['files'][int(x['row'])] for x in lines]
  assert all(x['file'].startswith('synthetic:') for x in lines)
  for key in ('psnr', 'ssim', 'auc', 'mse_gray'):
    assert np.mean([float(x[key]) for x in lines]) == pytest.approx(summary[key], rel=1e-5)
  assert 'grayscale' in r.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'colorflax.evaluate', f'--workdir={root}/run', '--checkpoint=12345'],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert bad.returncode == 2 and 'no checkpoint at step 12345' in bad.stderr
  # Any cache: --config.data.cache_dir overrides the recorded one.
  other = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.evaluate',
          f'--workdir={root}/run',
          f'--config.data.cache_dir={tmp_path}/elsewhere',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert other.returncode == 2 and f'no features cache at {tmp_path}/elsewhere' in other.stderr
  everything = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.evaluate',
          f'--workdir={root}/run',
          '--split=all',
          f'--config.data.cache_dir={config.data.cache_dir}',
          f'--json={out}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert everything.returncode == 0, everything.stderr[-2000:]
  assert json.loads(out.read_text())['num_images'] == 48


def test_evaluate_at_another_image_size(trained, tmp_path):
  root, config = trained
  other = small_config(tmp_path / 'cache48', num_epochs=3, **{'data.image_size': 48})
  precompute_features.precompute(other, progress=False)
  on_other_cache = small_config(tmp_path / 'cache48', num_epochs=3)  # the run's settings (32 px)
  with pytest.raises(
      UserError,
      match=r'holds 48px images, not 32px \(data.image_size\); to evaluate at 48px add '
      '--config.data.image_size=48',
  ):
    evaluate.evaluate(str(root / 'run'), on_other_cache, 'best', 'val')
  summary, _, _ = evaluate.evaluate(str(root / 'run'), other, 'best', 'val')
  assert (
      summary['num_images'] == 12
      and np.isfinite([summary['psnr'], summary['ssim'], summary['auc']]).all()
  )


def test_evaluate_batches_follow_eval_batch_size(trained, monkeypatch):
  root, config = trained
  shapes = []
  per_image_metrics = evaluate.per_image_metrics

  def recording(*args, **kwargs):
    fn = per_image_metrics(*args, **kwargs)
    return lambda variables, images, *rest: (
        shapes.append(images.shape[0]),
        fn(variables, images, *rest),
    )[1]

  monkeypatch.setattr(evaluate, 'per_image_metrics', recording)
  results = {}
  for eval_batch in (
      0,
      4,
      6,
  ):  # 0: the training batch (8); 6 is rounded up to split over the 4 devices
    shapes.clear()
    results[eval_batch], _, _ = evaluate.evaluate(
        str(root / 'run'),
        small_config(config.data.cache_dir, num_epochs=3, eval_batch_size=eval_batch),
        'best',
        'val',
    )
    assert shapes == {0: [8, 8], 4: [4, 4, 4], 6: [8, 8]}[eval_batch]  # 12 validation images
  for key in ('mse', 'psnr', 'ssim', 'auc', 'colorfulness'):
    assert results[4][key] == pytest.approx(results[0][key], rel=1e-5)


def test_evaluate_keeps_the_host_at_most_two_batches_ahead_of_the_device(trained, monkeypatch):
  # Without a bound, the host read the whole split and queued it in device memory (on CPU, host
  # memory, growing with the split: the commit that added it gives the command and the figures).
  root, config = trained
  outstanding, per_image_metrics = [], evaluate.per_image_metrics
  monkeypatch.setattr(
      evaluate,
      'per_image_metrics',
      lambda *a, **kw: slowed_down(per_image_metrics(*a, **kw), outstanding),
  )
  summary, _, _ = evaluate.evaluate(
      str(root / 'run'), small_config(config.data.cache_dir, eval_batch_size=4), 'best', 'all'
  )
  assert len(outstanding) == 12 and max(outstanding) <= 2, outstanding  # 48 images, batches of 4
  assert np.isfinite(summary['psnr'])


# orbax's other reads of the damaged arrays fail too, after the first error, in the background
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_damaged_checkpoint_and_config_are_one_line_errors(trained, tmp_path):
  root, config = trained
  run = tmp_path / 'run'
  shutil.copytree(root / 'run', run)
  latest = checkpoints.manager(run, read_only=True).latest_step()
  for f in (run / 'checkpoints' / str(latest) / 'model').rglob('*'):
    if f.is_file() and f.parent.name == 'd':  # the array data, cut short after it was written
      f.write_bytes(f.read_bytes()[:10])
  with pytest.raises(
      UserError, match=rf'checkpoint step {latest} in .* cannot be read \(.+\); choose another'
  ):
    evaluate.evaluate(str(run), config, 'latest', 'val')
  r = subprocess.run(
      [sys.executable, '-m', 'colorflax.evaluate', f'--workdir={run}', '--checkpoint=latest'],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
  assert f'checkpoint step {latest}' in r.stderr
  (run / 'config.json').write_text('{"data": ')  # e.g. edited by hand
  with pytest.raises(UserError, match='config.json is not valid JSON'):
    checkpoints.read_config(run)


def _inputs(folder):
  folder.mkdir()
  land = synthetic.landscape(777, 160)
  Image.fromarray(land).resize((75, 43)).save(folder / 'odd_landscape.jpg', quality=95)
  Image.fromarray(land).convert('L').resize((41, 90)).save(folder / 'portrait_gray.png')
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not really')
  return folder


def _assert_colorized(inputs, outputs):
  for name in ('odd_landscape', 'portrait_gray'):
    src = Image.open(next(inputs.glob(name + '.*')))
    out = Image.open(outputs / (name + '.png'))
    assert out.size == src.size
    gray = skcolor.rgb2gray(np.asarray(src.convert('RGB'), np.float64) / 255.0)
    l_in = skcolor.rgb2lab(np.repeat(gray[..., None], 3, -1))[..., 0]
    l_out = skcolor.rgb2lab(np.asarray(out, np.float64) / 255.0)[..., 0]
    assert np.abs(l_in - l_out).max() <= 1.0  # uint8 rounding of the output


def test_colorize_keeps_size_and_lightness(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  written, failed, _ = colorize.colorize(
      str(root / 'run'), config, [str(inputs)], str(tmp_path / 'out'), progress=False
  )
  assert len(written) == 2 and [os.path.basename(p) for p, _ in failed] == ['broken.jpg']
  _assert_colorized(inputs, tmp_path / 'out' / 'in')
  colourful = (
      np.asarray(Image.open(tmp_path / 'out' / 'in' / 'odd_landscape.png'), np.float32) / 255.0
  )
  assert float(metrics.colorfulness(jnp.asarray(colourful[None]))[0]) > 5.0  # it added colour


def test_colorize_skip_existing_finishes_an_interrupted_run(trained, tmp_path):
  root, config = trained
  inputs, out = _inputs(tmp_path / 'in'), tmp_path / 'out'
  colorize.colorize(str(root / 'run'), config, [str(inputs)], str(out), progress=False)
  os.remove(out / 'in' / 'portrait_gray.png')  # the run was stopped before this one
  before = os.stat(out / 'in' / 'odd_landscape.png').st_mtime_ns
  written, failed, kept = colorize.colorize(
      str(root / 'run'), config, [str(inputs)], str(out), progress=False, skip_existing=True
  )
  assert [os.path.relpath(p, out) for p in written] == ['in/portrait_gray.png']
  assert [os.path.relpath(p, out) for p in kept] == ['in/odd_landscape.png']
  assert [os.path.basename(p) for p, _ in failed] == ['broken.jpg']  # failures are tried again
  assert os.stat(out / 'in' / 'odd_landscape.png').st_mtime_ns == before
  _assert_colorized(inputs, out / 'in')


def test_colorize_stopped_mid_write_keeps_whole_outputs_and_says_how_to_finish(
    trained, tmp_path, monkeypatch
):
  # Ctrl-C (or SIGTERM, SIGHUP: signals.Stopped) lands while the second output is being written.
  root, config = trained
  inputs, out = _inputs(tmp_path / 'in'), tmp_path / 'out'
  real_save = Image.Image.save

  def save_then_stop(image, fp, *args, **kwargs):
    if (out / 'in' / 'odd_landscape.png').exists():  # the first output is done
      with open(fp, 'wb') as f:
        f.write(b'\x89PNG cut off')
      raise signals.Stopped(signal.SIGTERM)
    return real_save(image, fp, *args, **kwargs)

  monkeypatch.setattr(Image.Image, 'save', save_then_stop)
  with pytest.raises(signals.Interrupted) as stopped:
    colorize.colorize(
        str(root / 'run'), config, [str(inputs)], str(out), progress=False, batch_size=1
    )
  assert str(stopped.value) == (
      f'stopped by SIGTERM with 1 of 3 images colorized in {out} (each output complete; '
      f'1 by this run): run the same command with --skip_existing to do the rest'
  )
  assert stopped.value.exit_code == 143
  assert os.listdir(out / 'in') == ['odd_landscape.png']  # no cut-off file aside
  monkeypatch.undo()
  written, failed, kept = colorize.colorize(
      str(root / 'run'), config, [str(inputs)], str(out), progress=False, skip_existing=True
  )
  assert [os.path.relpath(p, out) for p in written + kept] == [
      'in/portrait_gray.png',
      'in/odd_landscape.png',
  ]
  _assert_colorized(inputs, out / 'in')


def test_an_input_that_is_not_a_regular_file_is_named_so(tmp_path):
  os.mkfifo(tmp_path / 'pipe.png')
  items = colorize.expand_inputs([str(tmp_path / 'pipe.png'), '/dev/urandom'])
  assert [why for _, _, why in items] == [
      'not a regular file (a pipe, a device?): give an image file'
  ] * 2


def test_no_two_inputs_get_the_same_output_name(tmp_path):
  for rel in (
      'in/photo.jpg',
      'in/photo.png',
      'in/Photo.webp',
      'in/sub/x.jpg',
      'in/y.tif',
      'other/y.tif',
      'third/y.tif',
  ):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b'not decoded here')
  items = colorize.expand_inputs(
      [
          str(tmp_path / 'in'),
          str(tmp_path / 'in' / 'y.tif'),
          str(tmp_path / 'y.tif'),
          str(tmp_path / 'other' / 'y.tif'),
          str(tmp_path / 'third' / 'y.tif'),
      ]
  )
  got = [(os.path.relpath(p, tmp_path), out, why) for p, out, why in items]
  assert got == [
      ('in/Photo.webp', 'in/Photo.webp.png', None),  # photo.* clash (also by case): keep extensions
      ('in/photo.jpg', 'in/photo.jpg.png', None),
      ('in/photo.png', 'in/photo.png.png', None),
      ('in/y.tif', 'in/y.png', None),  # once only, though given twice
      ('in/sub/x.jpg', 'in/sub/x.png', None),
      ('y.tif', None, 'no such file or folder'),
      ('other/y.tif', 'y.tif.png', None),  # files given alone: named by their base name
      ('third/y.tif', None, f'its output name y.tif.png is taken by {tmp_path}/other/y.tif'),
  ]


@pytest.mark.parametrize('resize', ['squash', 'center_crop'])
def test_colorize_colours_line_up_with_the_whole_frame(trained, resize):
  # A wide image, bright on its left third only; a stand-in model that makes bright pixels
  # reddish (a > 0) and dark ones greenish. Colours must land where the brightness is, in both
  # resize modes (center_crop once coloured the whole frame from its central square).
  root, config = trained
  config = config.copy_and_resolve_references()
  config.data.resize = resize
  predictor = colorizer.Colorizer(str(root / 'run'), config)
  predictor._predict = lambda variables, l, emb, hints=None, temperature=None: np.repeat(
      np.where(l > 0.5, 0.3, -0.3), 2, -1
  )
  gray = np.full((40, 120), 0.2, np.float32)
  gray[:, :40] = 0.9
  model_input, inception_input = predictor.working_images(gray)
  expected_crop = image_io.resize(Image.fromarray((gray * 255 + 0.5).astype(np.uint8)), 32, resize)
  np.testing.assert_array_equal(
      inception_input, np.asarray(expected_crop)
  )  # features as in training
  assert model_input.shape == ((32, 32) if resize == 'squash' else (32, 96))
  [ab] = predictor.colorize_batch([gray])
  rgb = colorizer.recombine(
      np.asarray(color.rgb_to_lab(np.repeat(gray[..., None], 3, -1)))[..., 0], ab
  )
  a = skcolor.rgb2lab(rgb / 255.0)[..., 1]
  assert (a[:, :36] > 5).all() and (a[:, 44:] < -5).all()


def test_colorize_output_that_cannot_be_written(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  (tmp_path / 'a_file').write_text('keep me')
  with pytest.raises(UserError, match='--output .*a_file is a file; give a folder'):
    colorize.colorize(
        str(root / 'run'), config, [str(inputs)], str(tmp_path / 'a_file'), progress=False
    )
  assert (tmp_path / 'a_file').read_text() == 'keep me'
  for refused in (
      dict(size=60),
      dict(which='999'),
  ):  # a refused run leaves no empty output folder behind
    with pytest.raises(
        UserError, match='--size must be a positive multiple of 8|no checkpoint at step 999'
    ):
      colorize.colorize(
          str(root / 'run'), config, [str(inputs)], str(tmp_path / 'out'), progress=False, **refused
      )
    assert not (tmp_path / 'out').exists()
  (tmp_path / 'out' / 'in' / 'odd_landscape.png').mkdir(
      parents=True
  )  # a folder where one output goes
  written, failed, _ = colorize.colorize(
      str(root / 'run'), config, [str(inputs)], str(tmp_path / 'out'), progress=False
  )
  assert [os.path.basename(p) for p in written] == [
      'portrait_gray.png'
  ]  # the others are still written
  reasons = {os.path.basename(p): r for p, r in failed}
  assert set(reasons) == {'broken.jpg', 'odd_landscape.jpg'} and reasons[
      'odd_landscape.jpg'
  ].startswith('cannot write')
  assert sorted(p.name for p in (tmp_path / 'out' / 'in').iterdir()) == [
      'odd_landscape.png',
      'portrait_gray.png',
  ]


def test_colorize_without_the_cache_its_random_inception_features_came_from(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  moved = config.copy_and_resolve_references()
  moved.data.cache_dir = str(tmp_path / 'moved')  # e.g. the cache was moved after training
  with pytest.raises(
      UserError, match=r'no features cache at .*moved: .* point to it with --config.data.cache_dir='
  ):
    colorize.colorize(
        str(root / 'run'), moved, [str(inputs)], str(tmp_path / 'out'), progress=False
    )
  shutil.copytree(config.data.cache_dir, tmp_path / 'moved')
  stats = (
      tmp_path
      / 'moved'
      / json.loads((tmp_path / 'moved' / 'manifest.json').read_text())['inception_calibration']
  )
  stats.unlink()
  with pytest.raises(
      UserError, match=f'has lost its calibrated Inception statistics \\({stats.name}\\)'
  ):
    colorize.colorize(
        str(root / 'run'), moved, [str(inputs)], str(tmp_path / 'out'), progress=False
    )
  assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').rglob('*.png'))


def test_full_resolution_work_is_chunked_and_shares_compilations(monkeypatch, tmp_path):
  monkeypatch.setattr(colorizer, '_CHUNK_PIXELS', 1 << 10)  # several chunks per image below
  rng = np.random.default_rng(0)
  reference = jax.jit(
      lambda l, ab: color.lab_to_rgb(jnp.concatenate([l, color.fit_ab_to_gamut(l, ab)], -1))
  )
  before = colorizer._lab_to_srgb_uint8._cache_size()
  for h, w in ((37, 61), (40, 59), (45, 70), (3, 5), (2, 7), (4, 3), (1, 1)):
    l = rng.uniform(0, 100, (h, w)).astype(np.float32)
    ab = rng.uniform(-1, 1, (4, 4, 2)).astype(np.float32)
    got = colorizer.recombine(l, ab)
    up = (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(ab[..., c], 'F').resize((w, h), Image.Resampling.BILINEAR)
                )
                for c in range(2)
            ],
            -1,
        )
        * 128
    )
    want = np.asarray(reference(l[..., None], up.astype(np.float32))) * 255
    assert got.shape == (h, w, 3)
    assert np.abs(got - want).max() <= 0.5 + 1e-3  # the same pixels, rounded to uint8
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gray = np.asarray(color.rgb_to_gray(rgb / np.float32(255)))
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    gray_full, l_full = colorizer.full_res_gray(tmp_path / 'rgb.png')
    np.testing.assert_allclose(gray_full, gray, atol=1e-6)
    np.testing.assert_allclose(
        l_full, np.asarray(color.rgb_to_lab(np.repeat(gray[..., None], 3, -1)))[..., 0], atol=1e-3
    )
  # Large images run as chunks of one size; small ones as powers of two: a few programs in all.
  assert colorizer._lab_to_srgb_uint8._cache_size() - before <= 3


def test_colorize_cli_exit_code_and_never_overwrites_inputs(trained, tmp_path):
  root, _ = trained
  inputs = _inputs(tmp_path / 'in')
  before = {p.name: p.read_bytes() for p in inputs.iterdir()}
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.colorize',
          f'--workdir={root}/run',
          f'--output={tmp_path}',
          str(inputs / 'odd_landscape.jpg'),
          str(inputs / 'broken.jpg'),
          str(inputs),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 1, r.stderr[-2000:]  # broken.jpg failed
  assert 'broken.jpg' in r.stdout
  assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
  # Writing into the inputs' own folder would clobber odd.png-style inputs: refused per file.
  png_in = tmp_path / 'pngs'
  png_in.mkdir()
  Image.fromarray(synthetic.landscape(1, 48)).save(png_in / 'a.png')
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.colorize',
          f'--workdir={root}/run',
          f'--output={png_in}',
          str(png_in / 'a.png'),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 1 and 'refusing to overwrite' in r.stdout
  assert np.array_equal(np.asarray(Image.open(png_in / 'a.png')), synthetic.landscape(1, 48))


def test_colorize_with_a_reference_gives_every_input_the_references_embedding(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  ref = tmp_path / 'reference.png'
  Image.fromarray(synthetic.landscape(5, 160)).save(ref)
  common = dict(progress=False)
  colorize.colorize(str(root / 'run'), config, [str(inputs)], str(tmp_path / 'own'), **common)
  written, failed, _ = colorize.colorize(
      str(root / 'run'), config, [str(inputs)], str(tmp_path / 'ref'), reference=str(ref), **common
  )
  assert len(written) == 2 and len(failed) == 1  # broken.jpg, as without a reference
  _assert_colorized(inputs, tmp_path / 'ref' / 'in')
  # What it wrote is the model's colour under the reference's embedding (of its grayscale, as
  # Inception saw the training images), computed here directly.
  c = colorizer.Colorizer(str(root / 'run'), config)
  ref_gray, _ = colorizer.full_res_gray(str(ref))
  embedding = c.embed([c.working_images(ref_gray)[1]])
  for name in ('odd_landscape', 'portrait_gray'):
    gray, l_full = colorizer.full_res_gray(str(next(inputs.glob(name + '.*'))))
    expected = colorizer.recombine(l_full, c.colorize_batch([gray], embedding)[0])
    got = np.asarray(Image.open(tmp_path / 'ref' / 'in' / f'{name}.png'))
    own = np.asarray(Image.open(tmp_path / 'own' / 'in' / f'{name}.png'))
    assert np.array_equal(got, expected) and not np.array_equal(got, own), name


def test_colorize_with_a_reference_folder_gives_each_input_its_own_reference(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  shutil.copy(inputs / 'portrait_gray.png', inputs / 'unmatched.png')
  refs = tmp_path / 'refs'
  refs.mkdir()
  for index, name in ((5, 'odd_landscape.png'), (9, 'portrait_gray.jpg')):
    Image.fromarray(synthetic.landscape(index, 160)).save(refs / name)
  written, failed, _ = colorize.colorize(
      str(root / 'run'),
      config,
      [str(inputs)],
      str(tmp_path / 'out'),
      progress=False,
      batch_size=2,  # one batch holds both references
      reference_dir=str(refs),
  )
  assert len(written) == 2
  reasons = {os.path.basename(p): why for p, why in failed}
  assert sorted(reasons) == ['broken.jpg', 'unmatched.png']  # broken: unreadable, as always
  assert reasons['unmatched.png'] == f'no reference for it in {refs} (an image named unmatched.*)'
  c = colorizer.Colorizer(str(root / 'run'), config)
  for name, ref in (('odd_landscape', 'odd_landscape.png'), ('portrait_gray', 'portrait_gray.jpg')):
    gray, l_full = colorizer.full_res_gray(str(next(inputs.glob(name + '.*'))))
    ab = c.colorize_batch([gray], c.embed_reference(str(refs / ref)))[0]
    got = np.asarray(Image.open(tmp_path / 'out' / 'in' / f'{name}.png'))
    assert np.array_equal(got, colorizer.recombine(l_full, ab)), name


def test_colorize_refuses_a_missing_or_unreadable_reference_before_any_output(trained, tmp_path):
  root, config = trained
  inputs = _inputs(tmp_path / 'in')
  (tmp_path / 'empty.png').write_bytes(b'')
  for given, why in (
      ({'reference': 'nope.png'}, '--reference .*nope.png: no such file'),
      ({'reference': 'empty.png'}, '--reference .*empty.png: empty file'),
      ({'reference_dir': 'nope'}, '--reference_dir .*nope: no such folder'),
      ({'reference': 'empty.png', 'reference_dir': 'in'}, 'give --reference .* not both'),
  ):
    with pytest.raises(UserError, match=why):
      colorize.colorize(
          str(root / 'run'),
          config,
          [str(inputs)],
          str(tmp_path / 'out'),
          progress=False,
          **{flag: str(tmp_path / name) for flag, name in given.items()},
      )
    assert not (tmp_path / 'out').exists()


def test_colorize_and_evaluate_a_convert_torch_checkpoint(trained, tmp_path):
  from colorflax import inception
  from colorflax.reference import EncDec

  torch.manual_seed(0)
  pth = tmp_path / 'seed.pth'
  torch.save(EncDec().state_dict(), pth)
  weights = tmp_path / 'inception.pth'  # offline stand-in for ImageNet weights
  torch.save(inception._architecture().state_dict(), weights)
  r = subprocess.run(
      [sys.executable, '-m', 'colorflax.convert_torch', str(pth), f'--workdir={tmp_path}/seed'],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 0, r.stderr
  assert checkpoints.read_config(tmp_path / 'seed').features.inception_weights == 'imagenet'
  inputs = _inputs(tmp_path / 'in')
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.colorize',
          f'--workdir={tmp_path}/seed',
          f'--output={tmp_path}/out',
          '--size=64',
          f'--config.features.inception_weights={weights}',
          str(inputs / 'odd_landscape.jpg'),
          str(inputs / 'portrait_gray.png'),
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  _assert_colorized(inputs, tmp_path / 'out')
  # A reference photo steers an imported prototype checkpoint too.
  written, failed, _ = colorize.colorize(
      str(tmp_path / 'seed'),
      checkpoints.read_config(tmp_path / 'seed'),
      [str(inputs / 'portrait_gray.png')],
      str(tmp_path / 'out_ref'),
      size=64,
      inception_weights=str(weights),
      progress=False,
      reference=str(inputs / 'odd_landscape.jpg'),
  )
  assert len(written) == 1 and not failed
  assert Image.open(tmp_path / 'out_ref' / 'portrait_gray.png').size == (41, 90)
  # evaluate's default checkpoint, 'best', is the imported one: it has no validation loss to rank
  # by.
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.evaluate',
          f'--workdir={tmp_path}/seed',
          f'--config.data.cache_dir={trained[1].data.cache_dir}',
          '--config.data.image_size=32',
          f'--json={tmp_path}/m.json',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / 'm.json').read_text())
  assert (
      summary['checkpoint_step'] == 0
      and summary['num_images'] == 12
      and np.isfinite(summary['psnr'])
  )
