"""Fréchet Inception Distance between colorized and true images (Heusel et al. 2017), as the
colorization literature reports it (DDColor's protocol: the same images, colorized and true).

Inception-v3's 2048-d pool features of each set (in torch, the RGB resized to 299), a Gaussian
fitted to each, and the Fréchet distance between the two Gaussians. The network is the one the
run's features came from (its cache's record): torchvision's ImageNet weights make a figure
that can be compared across machines; calibrated random weights one comparable within a run's
machine only. The result names them.
"""

import numpy as np


class Features:
  """The pool features of sets of images, added batch by batch (bounded memory: 2048 floats an
  image)."""

  def __init__(self, network, weights):
    self.network, self.weights, self.sets = network, weights, {}  # weights: what they are

  def add(self, name, rgb_uint8):
    from colorflax import inception

    x = inception.preprocess(np.asarray(rgb_uint8), colour=True)
    self.sets.setdefault(name, []).append(inception.embed(self.network, x, 'pool'))

  def __getitem__(self, name):
    return np.concatenate(self.sets[name]).astype(np.float64)


def frechet_distance(a, b):
  """The Fréchet distance between Gaussians fitted to feature sets a and b (N, D):
  |mu_a - mu_b|^2 + Tr(C_a) + Tr(C_b) - 2 Tr((C_a C_b)^1/2)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ua = (a - a.mean(0)) / np.sqrt(max(len(a) - 1, 1))  # C_a = ua' ua
  ub = (b - b.mean(0)) / np.sqrt(max(len(b) - 1, 1))
  mean_term = np.sum(np.square(a.mean(0) - b.mean(0)))
  traces = np.sum(np.square(ua)) + np.sum(np.square(ub))
  return float(mean_term + traces - 2 * _trace_sqrt_product(ua, ub))


def _trace_sqrt_product(ua, ub):
  """Tr((ua' ua ub' ub)^1/2) without a D x D matrix square root: the eigenvalues of C_a C_b are
  the squared singular values of ua ub' (exact, and cheap with fewer images than features), or,
  with more images, those of the symmetric C_a^1/2 C_b C_a^1/2."""
  if min(len(ua), len(ub)) < ua.shape[1]:
    return float(np.linalg.svd(ua @ ub.T, compute_uv=False).sum())
  w, v = np.linalg.eigh(ua.T @ ua)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  product = root @ (ub.T @ ub) @ root
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(product), 0, None))))
