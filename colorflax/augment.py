"""On-device training augmentation: one random affine warp per image (rotation, shear and
horizontal flip composed), resampled once, bilinearly, with dm-pix.

Fill mode: 'nearest' (edge pixels extended) by default, dm-pix's fast path on accelerators;
'constant' fills with black, as the prototype's torchvision transforms did.
"""

import dm_pix
import jax
import jax.numpy as jnp

FILL_MODES = ('nearest', 'constant')


def random_matrices(key, n, rotation_degrees, shear, flip_probability):
  """(n, 2, 2) pull matrices (output (y, x) -> input (y, x) offsets around the centre)."""
  k_rot, k_shear, k_flip = jax.random.split(key, 3)
  theta = jnp.deg2rad(rotation_degrees) * jax.random.uniform(k_rot, (n,), minval=-1.0, maxval=1.0)
  s = shear * jax.random.uniform(k_shear, (n,), minval=-1.0, maxval=1.0)
  flip = jnp.where(jax.random.uniform(k_flip, (n,)) < flip_probability, -1.0, 1.0)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # Forward map in (y, x): rotate, then shear x by s*y, then mirror x. Pull = its inverse.
  rot = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
  zeros, ones = jnp.zeros_like(s), jnp.ones_like(s)
  shr = jnp.stack([jnp.stack([ones, zeros], -1), jnp.stack([s, ones], -1)], -2)
  mirror = jnp.stack([jnp.stack([ones, zeros], -1), jnp.stack([zeros, flip], -1)], -2)
  forward = mirror @ shr @ rot
  return jnp.linalg.inv(forward)


def warp(images, matrices, fill_mode='nearest'):
  """images (B, H, W, C) float, matrices (B, 2, 2) pull maps around the image centre."""
  _, h, w, _ = images.shape
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])

  def one(image, m):
    full = jnp.eye(3).at[:2, :2].set(m)  # the channel axis maps to itself
    offset = jnp.concatenate([centre - m @ centre, jnp.zeros(1)])
    return dm_pix.affine_transform(image, full, offset=offset, order=1, mode=fill_mode)

  return jax.vmap(one)(images, matrices)


def random_affine(key, images, rotation_degrees, shear, flip_probability, fill_mode='nearest'):
  matrices = random_matrices(key, images.shape[0], rotation_degrees, shear, flip_probability)
  return warp(images, matrices, fill_mode)
