import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorflax import augment


def _dm_pix_warp(images, matrices, fill_mode):
  """The reference: dm-pix's affine_transform per image, the channel axis mapped to itself."""
  h, w = images.shape[1:3]
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])

  def one(image, m):
    offset = jnp.concatenate([centre - m @ centre, jnp.zeros(1)])
    return dm_pix.affine_transform(
        image, jnp.eye(3).at[:2, :2].set(m), offset=offset, order=1, mode=fill_mode
    )

  return jax.vmap(one)(images, matrices)


@pytest.mark.parametrize('fill_mode', augment.FILL_MODES)
def test_warp_is_dm_pix_affine_transform(fill_mode):
  images = jax.random.uniform(jax.random.key(0), (6, 24, 20, 3))
  # Large angles and shears, so that many pixels map outside the image.
  matrices = augment.random_matrices(jax.random.key(1), 6, 60.0, 0.5, 0.5)
  got = jax.jit(augment.warp, static_argnums=2)(images, matrices, fill_mode)
  want = _dm_pix_warp(images, matrices, fill_mode)
  assert got.shape == images.shape
  # Coordinates rounded one ulp apart (the products are summed in another order) move a value
  # by ~1e-5; a wrong corner or weight would move it by ~0.1.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  if fill_mode == 'constant':
    assert float(jnp.mean(got == 0)) > 0.05  # the black fill is there


def test_identity_and_flip_are_exact():
  images = jax.random.uniform(jax.random.key(0), (2, 9, 7, 3))
  identity = jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
  np.testing.assert_array_equal(augment.warp(images, identity), images)
  flipped = augment.random_affine(jax.random.key(3), images, 0.0, 0.0, flip_probability=1.0)
  np.testing.assert_array_equal(flipped, images[:, :, ::-1])


def test_warp_does_not_depend_on_how_the_batch_is_split_over_devices():
  from jax.sharding import NamedSharding, PartitionSpec as P

  assert jax.device_count() == 4
  images = jax.random.uniform(jax.random.key(0), (8, 32, 24, 3))
  matrices = augment.random_matrices(jax.random.key(1), 8, 20.0, 0.2, 0.5)
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  split = [jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (images, matrices)]
  warp = jax.jit(augment.warp)
  np.testing.assert_array_equal(warp(*split), warp(images, matrices))
