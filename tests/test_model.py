import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorflax import layers
from colorflax import model as model_lib
from colorflax.config_validation import validate
from colorflax.errors import ConfigError
from configs import default


def test_default_config_is_the_seed_model():
  model = model_lib.model_from_config(default.get_config())
  variables = model_lib.init_variables(model, jax.random.key(0))
  assert model_lib.count_params(variables['params']) == 7_142_984
  assert model_lib.count_params(variables['batch_stats']) == 768


@pytest.mark.parametrize('hw', [(64, 96), (32, 32)])
def test_any_size_divisible_by_8(hw):
  model = model_lib.Colorizer(width=0.125)
  variables = model_lib.init_variables(model, jax.random.key(0))
  L = jax.random.uniform(jax.random.key(1), (2, *hw, 1))
  e = jax.random.normal(jax.random.key(2), (2, 1000))
  out = model.apply(variables, L, e, train=False)
  assert out.shape == (2, *hw, 2) and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) <= 1.0  # tanh


def test_size_not_divisible_by_8_is_rejected():
  model = model_lib.Colorizer(width=0.125)
  variables = model_lib.init_variables(model, jax.random.key(0))
  with pytest.raises(ValueError, match='divisible by 8'):
    model.apply(variables, jnp.zeros((1, 60, 64, 1)), jnp.zeros((1, 1000)), train=False)


def test_pooled_2048_embedding():
  config = default.get_config()
  config.features.kind = 'pool'
  model = model_lib.model_from_config(config)
  variables = model_lib.init_variables(model, jax.random.key(0))
  assert variables['params']['dec1_0']['kernel'].shape == (3, 3, 256 + 2048, 128)
  out = model.apply(variables, jnp.zeros((1, 32, 32, 1)), jnp.ones((1, 2048)), train=False)
  assert out.shape == (1, 32, 32, 2)


def test_width_multiplier_scales_hidden_layers_only():
  small = model_lib.init_variables(model_lib.Colorizer(width=0.5), jax.random.key(0))['params']
  assert small['enc1_0']['kernel'].shape == (3, 3, 1, 64)
  assert small['dec1_0']['kernel'].shape == (3, 3, 128 + 1000, 64)
  assert small['dec4_0']['kernel'].shape == (3, 3, 2, 2)


def test_bfloat16_computes_in_bf16_with_float32_params():
  model = model_lib.Colorizer(width=0.125, dtype=jnp.bfloat16)
  variables = model_lib.init_variables(model, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  L = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
  e = jax.random.normal(jax.random.key(2), (2, 1000))
  hlo = jax.jit(lambda v: model.apply(v, L, e, train=False)).lower(variables).as_text()
  assert 'bf16' in hlo
  out_bf16 = model.apply(variables, L, e, train=False)
  out_f32 = model_lib.Colorizer(width=0.125).apply(variables, L, e, train=False)
  assert out_bf16.dtype == jnp.float32
  assert float(jnp.abs(out_bf16 - out_f32).max()) < 0.05  # same function, bf16 rounding


def test_training_mode_updates_batch_stats():
  model = model_lib.Colorizer(width=0.125)
  variables = model_lib.init_variables(model, jax.random.key(0))
  L = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1))
  e = jax.random.normal(jax.random.key(2), (4, 1000))
  _, updates = model.apply(variables, L, e, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['enc2_5']['mean']
  after = updates['batch_stats']['enc2_5']['mean']
  assert not np.allclose(before, after)


def test_upsample_concat_conv_is_the_plain_layer():
  # dec3_0's polyphase form against upsample -> concatenate -> 5x5 conv, values and gradients.
  low = jax.random.normal(jax.random.key(0), (2, 6, 5, 16))
  skip = jax.random.normal(jax.random.key(1), (2, 12, 10, 24))
  block = layers.UpsampleConcatConv(32)
  params = block.init(jax.random.key(2), low, skip)['params']
  assert params['kernel'].shape == (5, 5, 40, 32) and params['bias'].shape == (32,)
  plain = nn.Conv(32, (5, 5), padding='SAME')
  plain_fn = lambda p, low, skip: plain.apply(
      {'params': p}, jnp.concatenate([layers.upsample(low), skip], -1)
  )
  block_fn = lambda p, low, skip: block.apply({'params': p}, low, skip)
  cot = jax.random.normal(jax.random.key(3), (2, 12, 10, 32))
  np.testing.assert_allclose(
      block_fn(params, low, skip), plain_fn(params, low, skip), rtol=0, atol=1e-5
  )
  grads = [
      jax.grad(lambda *a: jnp.sum(cot * fn(*a)), argnums=(0, 1, 2))(params, low, skip)
      for fn in (block_fn, plain_fn)
  ]
  for x, y in zip(*map(jax.tree_util.tree_leaves, grads)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * float(jnp.abs(y).max()))


def test_max_pool_gradient_goes_to_the_first_maximum():
  x = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)  # a tie between (0, 1) and (1, 0)
  y = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  assert float(layers.max_pool(x)[0, 0, 0, 0]) == 3.0
  np.testing.assert_array_equal(layers.max_pool(y), nn.max_pool(y, (2, 2), strides=(2, 2)))
  g = jax.grad(lambda x: jnp.sum(layers.max_pool(x)))(x)
  np.testing.assert_array_equal(g.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])
  # Without ties it is nn.max_pool's gradient.
  cot = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
  ours = jax.grad(lambda y: jnp.sum(cot * layers.max_pool(y)))(y)
  theirs = jax.grad(lambda y: jnp.sum(cot * nn.max_pool(y, (2, 2), strides=(2, 2))))(y)
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize('hw', [(8, 6), (2, 2)])
def test_stem_conv_pool_is_the_plain_layers(hw):
  # enc1_0 against the seed's form: 3x3 conv with bias, then 2x2 max pool (gradient to the
  # first maximum, as PyTorch's); values, and gradients for the kernel, bias and input.
  L = jax.random.uniform(jax.random.key(0), (3, *hw, 1))
  block = layers.StemConvPool(24)
  params = block.init(jax.random.key(1), L)['params']
  assert params['kernel'].shape == (3, 3, 1, 24) and params['bias'].shape == (24,)
  plain = nn.Conv(24, (3, 3), padding='SAME')
  plain_fn = lambda p, L: layers.max_pool(plain.apply({'params': p}, L))
  block_fn = lambda p, L: block.apply({'params': p}, L)
  np.testing.assert_allclose(block_fn(params, L), plain_fn(params, L), rtol=0, atol=1e-6)
  cot = jax.random.normal(jax.random.key(2), (3, hw[0] // 2, hw[1] // 2, 24))
  grads = [
      jax.jit(jax.grad(lambda *a: jnp.sum(cot * fn(*a)), argnums=(0, 1)))(params, L)
      for fn in (block_fn, plain_fn)
  ]
  for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_stem_conv_pool_routes_ties_to_the_first_maximum():
  # A kernel that copies the centre pixel, and every window's (0, 1) and (1, 0) pixels tied
  # at its maximum: the gradient must go to (0, 1), PyTorch's first maximum. The off-centre
  # taps' gradients are sums of that pixel's neighbours, which differ between the two.
  L = jax.random.uniform(jax.random.key(0), (2, 6, 6, 1))
  L = L.at[:, 0::2, 1::2].set(2.0).at[:, 1::2, 0::2].set(2.0)
  block = layers.StemConvPool(3)
  params = {'kernel': jnp.zeros((3, 3, 1, 3)).at[1, 1].set(1.0), 'bias': jnp.zeros(3)}
  plain = nn.Conv(3, (3, 3), padding='SAME')
  fns = (
      lambda p: block.apply({'params': p}, L),
      lambda p: layers.max_pool(plain.apply({'params': p}, L)),
  )
  ours, theirs = [jax.grad(lambda p: jnp.sum(fn(p)))(params)['kernel'] for fn in fns]
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  pad = jnp.pad(L[..., 0], ((0, 0), (1, 1), (1, 1)))
  at_1_0 = jnp.stack(
      [
          jnp.stack([pad[:, 1 + dy : 1 + dy + 6 : 2, dx : dx + 6 : 2].sum() for dx in range(3)])
          for dy in range(3)
      ]
  )
  assert not np.allclose(ours[:, :, 0, 0], at_1_0)  # the other choice would be visible


def test_polyphase_dec3_auto_is_on_for_one_cpu_device_only():
  config = default.get_config()
  assert jax.default_backend() == 'cpu'
  assert model_lib.polyphase_dec3(config) == (jax.device_count() == 1)
  config.model.polyphase_dec3 = 'true'  # what a command-line override of the 'auto' string gives
  validate(config)
  assert model_lib.model_from_config(config).polyphase_dec3
  config.model.polyphase_dec3 = 'fast'
  with pytest.raises(ConfigError, match='model.polyphase_dec3'):
    validate(config)


@pytest.mark.parametrize(
    'hw', [(4, 6), (1, 2)]
)  # (1, 2): every tap but the centre row falls outside
def test_fusion_conv_is_the_plain_layer(hw):
  # dec1_0 against the seed's form: the embedding tiled over the grid, concatenated, 3x3 conv.
  x = jax.random.normal(jax.random.key(0), (3, *hw, 16))
  e = jax.random.normal(jax.random.key(1), (3, 40))
  block = layers.FusionConv(24)
  params = block.init(jax.random.key(2), x, e)['params']
  assert params['kernel'].shape == (3, 3, 56, 24) and params['bias'].shape == (24,)
  plain = nn.Conv(24, (3, 3), padding='SAME')
  tiled = lambda e: jnp.broadcast_to(e[:, None, None, :], (3, *hw, 40))
  plain_fn = lambda p, x, e: plain.apply({'params': p}, jnp.concatenate([x, tiled(e)], -1))
  block_fn = lambda p, x, e: block.apply({'params': p}, x, e)
  np.testing.assert_allclose(block_fn(params, x, e), plain_fn(params, x, e), rtol=0, atol=1e-5)
  cot = jax.random.normal(jax.random.key(3), (3, *hw, 24))
  grads = [
      jax.grad(lambda *a: jnp.sum(cot * fn(*a)), argnums=(0, 1, 2))(params, x, e)
      for fn in (block_fn, plain_fn)
  ]
  for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_conv_is_nn_conv_with_torch_init():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 5))
  ours = layers.Conv(7, 3)
  params = ours.init(jax.random.key(1), x)['params']
  bound = 1 / np.sqrt(5 * 3 * 3)  # torch.nn.Conv2d's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert params['kernel'].shape == (3, 3, 5, 7) and float(jnp.abs(params['kernel']).max()) <= bound
  assert float(jnp.abs(params['bias']).max()) <= bound
  theirs = nn.Conv(7, (3, 3), padding='SAME').apply({'params': params}, x)
  np.testing.assert_array_equal(ours.apply({'params': params}, x), theirs)


def test_materialized_conv_inputs_change_nothing_but_the_program():
  # The barrier is an identity: the same outputs and gradients. And XLA:CPU keeps it (the
  # compiled step has the conditionals): were a later XLA to fold them, this says so.
  L = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  e = jax.random.normal(jax.random.key(1), (2, 1000))
  plain, barriers = model_lib.Colorizer(), model_lib.Colorizer(materialize_conv_inputs=True)
  variables = model_lib.init_variables(plain, jax.random.key(2))
  loss = lambda m: jax.jit(
      jax.value_and_grad(lambda p: jnp.mean(m.apply({**variables, 'params': p}, L, e) ** 2))
  )
  (a, ga), (b, gb) = loss(plain)(variables['params']), loss(barriers)(variables['params'])
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * float(jnp.abs(x).max()))
  hlo = loss(barriers).lower(variables['params']).compile().as_text()
  assert hlo.count('conditional(') >= 15  # the 15 convolution inputs (14 `Conv`s and dec1_0's)
  assert 'conditional(' not in loss(plain).lower(variables['params']).compile().as_text()
  assert model_lib.model_from_config(default.get_config()).materialize_conv_inputs  # on, on CPU


@pytest.mark.parametrize(
    'hw,k,taps',
    [
        ((4, 4), 5, 25),
        ((3, 7), 5, 25),
        ((6, 2), 3, 9),
        ((2, 2), 5, 9),
        ((1, 1), 3, 1),
        ((1, 3), 5, 5),
        ((2, 9), 5, 15),
        ((5, 5), 5, None),
    ],
)
def test_convolution_on_a_grid_smaller_than_its_kernel_is_a_matmul(hw, k, taps):
  # XLA:CPU's convolution is 20-70x slower there (enc4's 5x5 conv in 32 px training): the same
  # values and gradients as lax's convolution, from a program without one, over only the taps
  # that reach the grid (`taps`); larger grids keep the convolution.
  x = jax.random.normal(jax.random.key(0), (3, *hw, 16))
  kernel = jax.random.normal(jax.random.key(1), (k, k, 16, 8))
  cot = jax.random.normal(jax.random.key(2), (3, *hw, 8))
  plain = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  outs = [fn(x, kernel) for fn in (layers.conv_same, plain)]
  np.testing.assert_allclose(*outs, rtol=0, atol=1e-5 * float(jnp.abs(outs[1]).max()))
  grads = [
      jax.grad(lambda *a: jnp.sum(cot * fn(*a)), argnums=(0, 1))(x, kernel)
      for fn in (layers.conv_same, plain)
  ]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
  program = str(
      jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(cot * layers.conv_same(*a)), argnums=(0, 1)))(
          x, kernel
      )
  )
  assert ('conv_general_dilated' in program) == (taps is None)
  if taps:
    (dot,) = [
        e
        for e in jax.make_jaxpr(layers.conv_same)(x, kernel).eqns
        if e.primitive.name == 'dot_general'
    ]
    assert dot.invars[1].aval.shape == (taps * 16, 8)
