import jax
import numpy as np
import pytest
from skimage import color as skcolor
from skimage import data as skdata

from colorflax import color


def _photos():
  # scikit-image's bundled real colour photographs.
  return [
      np.asarray(getattr(skdata, name)(), np.float64) / 255.0
      for name in ('astronaut', 'coffee', 'chelsea', 'rocket')
  ]


def _cube_extremes():
  corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing='ij')).reshape(3, -1).T
  near = np.array([[1e-6, 0, 0], [0.04045, 0.04045, 0.04045], [0.0405, 0.5, 1.0], [1, 1, 1 - 1e-6]])
  return np.concatenate([corners, near]).astype(np.float64)


def _inputs():
  rng = np.random.default_rng(0)
  yield 'random', rng.random((4096, 3))
  yield 'extremes', _cube_extremes()
  for i, p in enumerate(_photos()):
    yield f'photo{i}', p


@pytest.mark.parametrize('name,rgb', list(_inputs()), ids=lambda x: x if isinstance(x, str) else '')
def test_rgb_to_lab_matches_skimage(name, rgb):
  ours = np.asarray(jax.jit(color.rgb_to_lab)(rgb.astype(np.float32)))
  ref = skcolor.rgb2lab(rgb)
  assert np.abs(ours[..., 0] - ref[..., 0]).max() <= 1e-3
  assert np.abs(ours[..., 1:] - ref[..., 1:]).max() <= 1e-2


@pytest.mark.parametrize('name,rgb', list(_inputs()), ids=lambda x: x if isinstance(x, str) else '')
def test_lab_to_rgb_matches_skimage_and_round_trips(name, rgb):
  lab = skcolor.rgb2lab(rgb)
  ours = np.asarray(jax.jit(color.lab_to_rgb)(lab.astype(np.float32)))
  assert np.abs(ours - skcolor.lab2rgb(lab)).max() <= 1e-3
  round_trip = np.asarray(
      jax.jit(lambda x: color.lab_to_rgb(color.rgb_to_lab(x)))(rgb.astype(np.float32))
  )
  assert np.abs(round_trip - rgb).max() <= 1e-3


def test_lab_to_rgb_clips_out_of_gamut():
  lab = np.array([[50.0, 120.0, -120.0], [100.0, 0.0, 100.0], [0.0, -100.0, 0.0]], np.float32)
  rgb = np.asarray(color.lab_to_rgb(lab))
  assert rgb.min() >= 0.0 and rgb.max() <= 1.0
  assert np.abs(rgb - np.clip(skcolor.lab2rgb(lab.astype(np.float64)), 0, 1)).max() <= 1e-3


def test_gray_matches_skimage():
  photo = _photos()[0]
  assert (
      np.abs(
          np.asarray(color.rgb_to_gray(photo.astype(np.float32))) - skcolor.rgb2gray(photo)
      ).max()
      <= 1e-5
  )


def test_seed_normalisation_round_trips():
  rgb = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
  lab = color.rgb_to_lab(rgb)
  l_norm, ab_norm = color.normalize_lab(lab)
  assert l_norm.shape == (2, 8, 8, 1) and ab_norm.shape == (2, 8, 8, 2)
  assert float(l_norm.min()) >= 0 and float(l_norm.max()) <= 1.0 + 1e-6
  np.testing.assert_allclose(np.asarray(l_norm[..., 0]) * 100, np.asarray(lab[..., 0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ab_norm) * 128, np.asarray(lab[..., 1:]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(color.lab_norm_to_rgb(l_norm, ab_norm)), rgb, atol=1e-3)


def test_rgb_to_lab_has_finite_gradient_at_black():
  g = jax.grad(lambda x: color.rgb_to_lab(x).sum())(np.zeros((2, 3), np.float32))
  assert np.all(np.isfinite(np.asarray(g)))


def test_fit_ab_to_gamut_keeps_lightness_and_hue_and_takes_the_most_chroma():
  rng = np.random.default_rng(2)
  l = rng.uniform(1, 99, (4096, 1)).astype(np.float32)
  ab = rng.uniform(-128, 127, (4096, 2)).astype(np.float32)
  fitted = np.asarray(jax.jit(color.fit_ab_to_gamut)(l, ab))

  def raw_rgb(ab_):  # sRGB without clipping, to see whether a colour is inside the gamut
    return np.asarray(color.lab_to_rgb(np.concatenate([l, ab_], -1), clip=False), np.float64)

  scale = np.linalg.norm(fitted, axis=-1) / np.linalg.norm(ab, axis=-1)
  inside = np.all((raw_rgb(ab) >= -1e-4) & (raw_rgb(ab) <= 1 + 1e-4), -1)
  assert 0.05 < inside.mean() < 0.95  # the test sees both kinds of pixel
  np.testing.assert_array_equal(fitted[inside], ab[inside])  # in-gamut colours are untouched
  np.testing.assert_allclose(fitted, ab * scale[:, None], rtol=1e-5, atol=1e-4)  # same hue
  rgb = raw_rgb(fitted)
  assert rgb.min() >= -2e-4 and rgb.max() <= 1 + 2e-4  # now inside
  # ...with the most chroma the bisection can resolve: 1/2^12 more is outside again.
  more = raw_rgb(ab * np.minimum(scale + 2.0**-11, 1.0)[:, None])
  outside_again = np.any((more < -1e-4) | (more > 1 + 1e-4), -1)
  assert outside_again[~inside].mean() > 0.99
