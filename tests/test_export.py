"""`colorflax.export`: one ONNX model of the whole colorizer, and its onnxruntime-only script."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from colorflax import checkpoints, colorizer, export, train
from colorflax.errors import UserError

sys.path.insert(0, os.path.dirname(__file__))
from test_train import REPO, small_config  # noqa: E402

ort = pytest.importorskip('onnxruntime', reason='export tests need the export extra')
pytest.importorskip('jax2onnx', reason='export tests need the export extra')


def _trained_and_exported(cache_dir, tmp_path_factory, name, overwrite=False, **over):
  work = tmp_path_factory.mktemp(name) / 'run'
  config = small_config(cache_dir, num_epochs=1, samples_every_epochs=0, **over)
  train.train_and_evaluate(config, str(work), progress=False)
  config = checkpoints.read_config(str(work))
  return (work, config, *_export(work, config, tmp_path_factory, name, overwrite))


def _export(work, config, tmp_path_factory, name, overwrite=False):
  out = tmp_path_factory.mktemp(name) / 'onnx'
  if overwrite:  # an earlier export's folder, with something of its own
    out.mkdir()
    (out / 'stale.txt').write_text('old')
  meta = export.export(str(work), config, str(out), overwrite=overwrite)
  return out, meta


@pytest.fixture(scope='module')
def exported(small_run, tmp_path_factory):
  """The seed model (mse), trained briefly on the synthetic data, and its export."""
  work, config = small_run
  return (work, config, *_export(work, config, tmp_path_factory, 'mse'))


def _onnx_ab(out, meta, grays, hint_channels=None):
  """The exported model's ab for full-res grayscales, fed as colorize.py feeds it."""
  session = ort.InferenceSession(str(out / 'colorizer.onnx'))
  s = meta['size']
  feeds = {'gray': [], 'inception_gray': []}
  for gray in grays:
    img = Image.fromarray((gray * 255 + 0.5).astype(np.uint8))
    feeds['gray'].append(np.asarray(img.resize((s, s), Image.BOX), np.float32)[..., None] / 255)
  feeds['inception_gray'] = feeds['gray']  # squash: the same square
  feeds = {k: np.stack(v) for k, v in feeds.items()}
  if hint_channels is not None:
    feeds['hints'] = np.concatenate(hint_channels).astype(np.float32)
  return session.run(['ab'], feeds)[0]


def _colorize_ab(work, config, grays, hint_channels=None):
  predictor = colorizer.Colorizer(str(work), config)
  return np.stack(predictor.colorize_batch(grays, hint_channels=hint_channels)) * 128


def test_the_export_matches_colorize_within_a_tenth_of_a_lab_unit_on_photos(exported, real_photos):
  work, config, out, meta = exported
  # jax2onnx left jnp.cumsum patched to refuse a positional axis, which colour hints use.
  np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 2)), 0), [[1, 1], [2, 2]])
  assert meta['inputs'] == ['inception_gray', 'gray'] and meta['resize'] == 'squash'
  grays = [colorizer.full_res_gray(p)[0] for p in real_photos]
  expected = _colorize_ab(work, config, grays)
  assert np.abs(expected).max() > 1  # colours to compare, not zeros
  got = _onnx_ab(out, meta, grays)  # one batch of 4: the batch axis is dynamic
  assert got.shape == expected.shape == (4, 32, 32, 2)
  np.testing.assert_allclose(got, expected, rtol=0, atol=0.1)
  np.testing.assert_allclose(_onnx_ab(out, meta, grays[:1]), expected[:1], rtol=0, atol=0.1)


def _run_script_without_the_training_stack(out, inputs, dest):
  """colorize.py in a process where importing jax, torch, flax or colorflax fails."""
  code = (
      'import runpy, sys\n'
      "for name in ('jax', 'torch', 'flax', 'colorflax', 'tensorflow'):\n"
      '  sys.modules[name] = None\n'
      f'sys.argv = ["colorize.py", {str(out)!r}, *{[str(p) for p in inputs]!r}, '
      f'"--output", {str(dest)!r}]\n'
      f"runpy.run_path({str(out / 'colorize.py')!r}, run_name='__main__')\n"
  )
  return subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=out
  )


def test_the_onnxruntime_script_colorizes_photos_as_colorize_does(exported, real_photos, tmp_path):
  from colorflax import colorize

  work, config, out, _ = exported
  (broken := tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
  r = _run_script_without_the_training_stack(out, [broken, *real_photos], tmp_path / 'onnx')
  assert r.returncode == 1 and r.stderr.startswith(f'skipped {broken}: '), r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'onnx')) == sorted(p.stem + '.png' for p in real_photos)
  written, failed, _ = colorize.colorize(
      str(work), config, [str(p) for p in real_photos], str(tmp_path / 'jax'), progress=False
  )
  assert len(written) == len(real_photos) and not failed
  for p in real_photos:
    name = p.stem + '.png'
    ours = np.asarray(Image.open(tmp_path / 'onnx' / name), np.int16)
    theirs = np.asarray(Image.open(tmp_path / 'jax' / name), np.int16)
    assert ours.shape == theirs.shape == np.asarray(Image.open(p)).shape
    # The same colours: a rounding step apart where float32 and float64 differ.
    assert np.abs(ours - theirs).max() <= 1
    assert (ours != theirs).mean() < 0.01


def test_a_classification_model_with_hints_exports_its_decoding_and_hint_input(
    small_cache, tmp_path_factory, real_photos
):
  from colorflax import hints

  work, config, out, meta = _trained_and_exported(
      small_cache,
      tmp_path_factory,
      'cls',
      overwrite=True,
      loss='classification',
      **{'model.hints': True},
  )
  assert sorted(os.listdir(out)) == sorted(export.FILES)  # replaced whole
  assert not [f for f in os.listdir(out.parent) if f.startswith('.onnx')]  # nothing left aside
  assert meta['inputs'] == ['inception_gray', 'gray', 'hints']
  assert meta['loss'] == 'classification' and meta['temperature'] == pytest.approx(0.38)
  grays = [colorizer.full_res_gray(p)[0] for p in real_photos[:2]]
  (tmp := tmp_path_factory.mktemp('hints') / 'hints.json').write_text(
      json.dumps(
          {'points': [{'x': 40, 'y': 40, 'rgb': '#d02020'}, {'x': 120, 'y': 100, 'rgb': '#2040d0'}]}
      )
  )
  points = hints.read_points(tmp)
  channels = [hints.points_for(points, 'test', g.shape[::-1], (32, 32)) for g in grays]
  for given in (None, channels):
    expected = _colorize_ab(work, config, grays, given)
    onnx_hints = given if given is not None else [np.zeros((1, 32, 32, 3))] * len(grays)
    np.testing.assert_allclose(_onnx_ab(out, meta, grays, onnx_hints), expected, atol=0.1)


def test_export_refuses_what_it_cannot_do_in_one_line(exported, tmp_path):
  work, config, out, _ = exported
  with pytest.raises(UserError, match='exists: give a new folder, or --overwrite'):
    export.export(str(work), config, str(out))
  with pytest.raises(UserError, match='no complete checkpoint in '):
    export.export(str(tmp_path / 'nothing'), config, str(tmp_path / 'a'))
  unknown = config.copy_and_resolve_references()
  unknown.loss = 'perceptual'
  with pytest.raises(UserError, match="unknown loss 'perceptual'"):
    export.export(str(work), unknown, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')
  r = subprocess.run(
      [sys.executable, '-m', 'colorflax.export', f'--workdir={work}', f'--output={out}'],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
  )
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert '--overwrite' in r.stderr
  with open(out / 'colorizer.json') as f:  # the refused export left the old one whole
    assert json.load(f)['format'] == 'colorflax-onnx'


@pytest.mark.parametrize('kind', ['pool', 'probs'])
def test_the_inception_graph_gives_each_feature_kind_as_inception_embed_does(kind):
  # 'logits' is in every export above; the other kinds end the network elsewhere.
  import torch

  from colorflax import inception

  torch.manual_seed(0)
  net, _ = inception.load_model('random')
  grays = np.random.default_rng(0).integers(0, 256, (2, 40, 40), np.uint8)
  expected = inception.embed(net, inception.preprocess(grays), kind)
  graph = export._inception_graph(net, kind, 40)
  session = ort.InferenceSession(graph.SerializeToString())
  got = session.run(None, {'inception_gray': grays[..., None].astype(np.float32) / 255})[0]
  assert got.shape == expected.shape == (2, 2048 if kind == 'pool' else 1000)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got / scale, expected / scale, rtol=0, atol=1e-4)
