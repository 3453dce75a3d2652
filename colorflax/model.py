"""The seed colorizer (`enc_dec`) in Flax linen, exactly as SPEC §1.

Layer names mirror the PyTorch prototype's state_dict keys (`enc2.1` -> `enc2_1`), so that
importing its checkpoints is a transpose per tensor and nothing else.

Linen rather than NNX: the training step is a pure function of (params, batch_stats, batch),
which `jax.jit`, `lax.scan` and sharding compose with directly, with no per-step
split/merge of a mutable object graph in Python.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colorflax import hints as hints_lib
from colorflax import losses as losses_lib
from colorflax.layers import (
    Conv,
    FusionConv,
    StemConvPool,
    UpsampleConcatConv,
    conv_same,
    max_pool,
    upsample,
)

# The global embedding's width for each features.kind (Inception-v3's logits, softmax, pool).
EMBEDDING_DIMS = {'logits': 1000, 'probs': 1000, 'pool': 2048}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
POLYPHASE_DEC3 = ('auto', 'true', 'false')  # model.polyphase_dec3 ('1' and '0' are read too)


def _leaky(x):
  return nn.leaky_relu(x, negative_slope=0.1)


class Colorizer(nn.Module):
  """Encoder + decoder + skips + fusion of a global embedding.

  `__call__(L, embedding, train, hints)`: L is (B, H, W, 1) = L*/100 in [0, 1], H and W
  divisible by 8; embedding is (B, embedding_dim); hints (B, H, W, 3) for a model with `hints`
  (None: none). Returns (B, H, W, 2) = predicted ab/128, float32.
  `width` scales every hidden layer (1.0 is the seed); `dtype` is the compute dtype, the
  parameters stay float32.
  """

  width: float = 1.0
  embedding_dim: int = 1000
  dtype: Any = jnp.float32
  # dec3_0 as UpsampleConcatConv (fewer FLOPs). Its float rounding varies with the per-device
  # batch, which would break the agreement of 1- and N-device runs (tested to 1e-5), so
  # model_from_config turns it on where it was measured to pay: on a single CPU device.
  polyphase_dec3: bool = False
  # > 0: the decoder ends in `classes` logits per pixel at half resolution (dec3_6 and dec4
  # replaced), for the classification loss; 0 (the seed): ab/128 through tanh.
  classes: int = 0
  # Every convolution's input stored by itself, for XLA:CPU's weight gradients
  # (`layers._materialized`);
  # model_from_config turns it on for the CPU backend.
  materialize_conv_inputs: bool = False
  # Colour hints (colorflax.hints): three more input channels, hint a, hint b and their mask,
  # into enc1_0 (through a kernel that starts at zero) and to the output layer (HintsOut). Off:
  # the seed model.
  hints: bool = False

  def _ch(self, n):
    return max(1, int(round(n * self.width)))

  @nn.compact
  def __call__(self, L, embedding, train: bool = False, hints=None):
    if L.ndim != 4 or L.shape[-1] != 1:
      raise ValueError(f'L must be (B, H, W, 1), got {L.shape}')
    if L.shape[1] % 8 or L.shape[2] % 8:
      raise ValueError(f'H and W must be divisible by 8, got {L.shape[1]}x{L.shape[2]}')
    if embedding.shape != (L.shape[0], self.embedding_dim):
      raise ValueError(
          f'embedding must be ({L.shape[0]}, {self.embedding_dim}), got {embedding.shape}'
      )
    if hints is not None and not self.hints:
      raise ValueError('this model takes no colour hints (model.hints is off)')
    if self.hints:
      hints = hints_lib.none(L) if hints is None else hints
      if hints.shape != L.shape[:3] + (hints_lib.CHANNELS,):
        raise ValueError(f'hints must be {L.shape[:3] + (hints_lib.CHANNELS,)}, got {hints.shape}')
    c = self._ch
    mat = self.materialize_conv_inputs
    conv = lambda n, k, name: Conv(n, k, self.dtype, mat, name=name)
    # PyTorch BatchNorm2d defaults: eps 1e-5, running-stat momentum 0.1 (Flax: 0.9).
    bn = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
    )

    # enc1 = leaky(conv), then max pool. Leaky ReLU is increasing, so it commutes with the max
    # (same values, same first maximum, same slope there): StemConvPool computes conv + pool on
    # the pooled grid and the activation follows.
    x = _leaky(StemConvPool(c(128), self.dtype, name='enc1_0')(L, hints))
    x = nn.relu(conv(c(128), 5, 'enc2_1')(x))
    x = nn.relu(conv(c(128), 3, 'enc2_3')(x))
    enc2 = bn('enc2_5')(x)

    x = max_pool(enc2)
    x = nn.relu(conv(c(256), 5, 'enc3_1')(x))
    enc3 = nn.relu(conv(c(256), 3, 'enc3_3')(x))

    x = max_pool(enc3)
    x = nn.relu(conv(c(256), 5, 'enc4_1')(x))
    x = nn.relu(conv(c(256), 3, 'enc4_3')(x))
    x = nn.relu(conv(c(256), 3, 'enc4_5')(x))
    enc4 = bn('enc4_7')(x)

    # Fusion: the embedding tiled over the bottleneck grid, after the enc4 channels.
    x = nn.relu(FusionConv(c(128), self.dtype, mat, name='dec1_0')(enc4, embedding))
    x = upsample(_leaky(conv(c(64), 3, 'dec1_2')(x)))

    x = jnp.concatenate([x, enc3], axis=-1)
    x = nn.relu(conv(c(128), 3, 'dec2_0')(x))

    if self.polyphase_dec3:  # upsample, concatenate [dec2, enc2], conv 5x5, in one
      x = nn.relu(UpsampleConcatConv(c(64), self.dtype, mat, name='dec3_0')(x, enc2))
    else:
      x = jnp.concatenate([upsample(x), enc2], axis=-1)
      x = nn.relu(conv(c(64), 5, 'dec3_0')(x))
    x = nn.relu(conv(c(64), 3, 'dec3_2')(x))
    x = nn.relu(conv(c(32), 3, 'dec3_4')(x))
    if self.classes:  # classification (losses.Objective): a logit per ab bin, at half resolution
      logits = conv(self.classes, 1, 'logits')(x)
      if self.hints:
        half = hints_lib.half_resolution(hints)
        logits = logits + HintsOut(self.classes, losses_lib.bin_centres(), name='hints_out')(half)
      return logits.astype(jnp.float32)
    x = upsample(_leaky(conv(2, 3, 'dec3_6')(x)))

    x = conv(2, 3, 'dec4_0')(x)
    if self.hints:
      x = x + HintsOut(2, name='hints_out')(hints)
    return jnp.tanh(x).astype(jnp.float32)


HINT_SIGMA = 30.0  # Lab units: the width of the classification head's initial prior around hints


class HintsOut(nn.Module):
  """The hints' direct path to the output layer (before its tanh, or to the logits), as the
  shortcut from the first layers to the last carries them in Zhang et al.'s network: a 3x3
  convolution of the hint channels (from zero), plus a linear map of the hints spread over the
  image (hints.spread), both at the output's resolution.

  The spread colour starts added as it is for the regression head (`centres` None: ab/128
  onto the ab before tanh), and as the log of a Gaussian around it (HINT_SIGMA) for the
  classification head (`centres`, the bins' ab), which is linear in the colour:
  c.h / s^2 - |c|^2 / 2s^2 per bin c, the second term on the confidence channel. Without hints,
  and far from them, both terms are zero."""

  features: int
  centres: Any = None  # (Q, 2) Lab units: the classification head's bins

  @nn.compact
  def __call__(self, hints):
    zeros = nn.initializers.zeros
    kernel = self.param('kernel', zeros, (3, 3, hints_lib.CHANNELS, self.features), jnp.float32)
    spread_kernel = self.param('spread_kernel', self._spread_init, (3, self.features))
    return conv_same(hints, kernel) + hints_lib.spread(hints) @ spread_kernel

  def _spread_init(self, key, shape):
    """(c a, c b, c) -> the output: the identity (regression), a Gaussian's log (classification)."""
    if self.centres is None:
      return jnp.eye(*shape, dtype=jnp.float32)
    c = jnp.asarray(self.centres, jnp.float32)
    s2 = HINT_SIGMA**2
    ab_scale = 128.0  # the hints' colour is ab/128
    return jnp.concatenate([c.T * ab_scale / s2, -jnp.sum(c * c, -1)[None] / (2 * s2)], axis=0)


def model_from_config(config) -> Colorizer:
  """The model a config describes; the embedding size follows the feature kind, the output the
  loss (losses.Objective.classes)."""
  from colorflax import losses

  return Colorizer(
      classes=losses.objective(config).classes,
      width=config.model.width,
      embedding_dim=EMBEDDING_DIMS[config.features.kind],
      dtype=DTYPES[config.model.dtype],
      polyphase_dec3=polyphase_dec3(config),
      materialize_conv_inputs=jax.default_backend() == 'cpu',
      hints=uses_hints(config),
  )


def uses_hints(config) -> bool:
  """`model.hints` (a config saved before it existed: off)."""
  return bool(config.model.get('hints', False))


def polyphase_dec3(config) -> bool:
  """`model.polyphase_dec3`: 'auto' is on for a single CPU device (see Colorizer). A
  command-line override of 'auto' arrives as a string."""
  value = config.model.get('polyphase_dec3', 'auto')  # configs saved before it existed
  if value == 'auto':
    return jax.default_backend() == 'cpu' and jax.device_count() == 1
  return str(value).lower() in ('true', '1')


@functools.partial(jax.jit, static_argnames=('model', 'image_size'))
def init_variables(model: Colorizer, rng, image_size: int = 8):
  """Parameters and BatchNorm statistics: the one initialisation of every caller (jax.eval_shape
  of it gives the shapes alone). Their values do not depend on `image_size` (the model is fully
  convolutional), so the smallest valid size, 8, is the default."""
  L = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
  e = jnp.zeros((1, model.embedding_dim), jnp.float32)
  return model.init(rng, L, e, train=False)


def make_predict(model: Colorizer, objective=None):
  """jit(variables, L/100 (B, H, W, 1), embeddings (B, D), hints=None, temperature=None) ->
  ab/128 (B, H, W, 2), eval mode: the model's output decoded by `objective` (losses.Objective;
  None: the output is ab/128). `hints` (B, H, W, 3): colorflax.hints' channels, for a model with
  hints. `temperature`: the classification decoding's, instead of the objective's (an argument
  of the compiled function: another value does not compile again)."""

  def predict(variables, l_norm, emb, hints=None, temperature=None):
    output = model.apply(variables, l_norm, emb, train=False, hints=hints)
    if objective is None:
      return output
    if temperature is not None:
      return dataclasses.replace(objective, temperature=temperature).decode(output)
    return objective.decode(output)

  return jax.jit(predict)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
