import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorflax import model as model_lib
from colorflax import tiled_conv
from colorflax.errors import ConfigError
from colorflax.config_validation import validate
from configs import default


def _native_weight_grad(x, dy, k):
  w = jnp.zeros((k, k, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.vjp(lambda w: tiled_conv._conv(x, w, 'SAME'), w)[1](dy)[0]


@pytest.mark.parametrize('hw,k,tile', [((20, 12), 5, 8),  # ragged tiles, halo wider than a last tile
                                       ((16, 16), 3, 16),  # one tile per image
                                       ((7, 9), 3, 4),  # odd sizes
                                       ((8, 8), 5, 32)])  # tile larger than the image
def test_weight_grad_is_the_native_gradient(hw, k, tile):
  x = jax.random.normal(jax.random.key(0), (3, *hw, 5))
  dy = jax.random.normal(jax.random.key(1), (3, *hw, 4))
  want = _native_weight_grad(x, dy, k)
  got = tiled_conv.weight_grad(x, dy, k, tile)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)


def test_conv_same_gradients_match_lax():
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) * 0.1
  loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
  got = jax.grad(loss(lambda x, w: tiled_conv.conv_same(x, w, 4)), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: tiled_conv._conv(x, w, 'SAME')), argnums=(0, 1))(x, w)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, atol=1e-5 * float(jnp.abs(h).max()), rtol=0)


def test_bfloat16_weight_grad_keeps_the_kernel_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16), jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1).astype(jnp.bfloat16)
  dw = jax.grad(lambda w: jnp.sum(tiled_conv.conv_same(x, w, 4).astype(jnp.float32)))(w)
  want = jax.grad(lambda w: jnp.sum(tiled_conv._conv(x, w, 'SAME').astype(jnp.float32)))(w)
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(want, np.float32), rtol=0,
                             atol=0.02 * float(jnp.abs(want.astype(jnp.float32)).max()))


def test_unsupported_convolutions_are_refused():
  conv = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME', conv_general_dilated=tiled_conv.flax_conv_fn(8))
  with pytest.raises(ValueError, match='stride-1 SAME'):
    conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))


def test_auto_tiles_on_one_cpu_device_and_overrides_are_numbers():
  config = default.get_config()
  assert jax.default_backend() == 'cpu'
  want = model_lib.AUTO_WEIGHT_GRAD_TILE if jax.device_count() == 1 else 0
  assert model_lib.weight_grad_tile(config) == want
  config.model.weight_grad_tile = '0'  # what a command-line override of the 'auto' string gives
  validate(config)
  assert model_lib.model_from_config(config).weight_grad_tile == 0
  assert not model_lib.model_from_config(config).polyphase_dec3  # 'auto' follows the tiles
  config.model.polyphase_dec3 = 'true'
  assert model_lib.model_from_config(config).polyphase_dec3
  config.model.weight_grad_tile = 'fast'
  with pytest.raises(ConfigError, match='model.weight_grad_tile'):
    validate(config)


def test_max_pool_gradient_goes_to_the_first_maximum():
  x = jnp.array([[1., 3.], [3., 0.]]).reshape(1, 2, 2, 1)  # a tie between (0, 1) and (1, 0)
  y = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  assert float(model_lib._max_pool(x)[0, 0, 0, 0]) == 3.0
  np.testing.assert_array_equal(model_lib._max_pool(y), nn.max_pool(y, (2, 2), strides=(2, 2)))
  g = jax.grad(lambda x: jnp.sum(model_lib._max_pool(x)))(x)
  np.testing.assert_array_equal(g.reshape(2, 2), [[0., 1.], [0., 0.]])
  # Without ties it is nn.max_pool's gradient.
  cot = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
  ours = jax.grad(lambda y: jnp.sum(cot * model_lib._max_pool(y)))(y)
  theirs = jax.grad(lambda y: jnp.sum(cot * nn.max_pool(y, (2, 2), strides=(2, 2))))(y)
  np.testing.assert_array_equal(ours, theirs)
