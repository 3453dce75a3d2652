"""Import the PyTorch prototype's checkpoints (a `enc_dec` state_dict) into the Flax model."""

import os

import numpy as np

from colorflax import model as model_lib
from colorflax.errors import UserError


def _prefix_free(state_dict):
  """Accept the usual wrappers: {'state_dict': ...} and DataParallel's 'module.' prefix."""
  if (
      isinstance(state_dict, dict)
      and 'state_dict' in state_dict
      and isinstance(state_dict['state_dict'], dict)
  ):
    state_dict = state_dict['state_dict']
  if not isinstance(state_dict, dict):
    raise UserError(f'expected a state_dict (a dict of tensors), got {type(state_dict).__name__}')
  if state_dict and all(k.startswith('module.') for k in state_dict):
    state_dict = {k[len('module.') :]: v for k, v in state_dict.items()}
  return state_dict


def torch_to_flax(state_dict):
  """A prototype state_dict (tensors or arrays) -> (embedding_dim, Flax variables as numpy)."""
  from colorflax.reference import state_dict_shapes

  state_dict = _prefix_free(state_dict)
  if 'dec1.0.weight' not in state_dict:
    raise UserError("not a seed enc_dec state_dict: it has no 'dec1.0.weight'")
  embedding_dim = int(state_dict['dec1.0.weight'].shape[1]) - 256
  expected = state_dict_shapes(embedding_dim)
  for key, shape in expected.items():
    if key not in state_dict:
      raise UserError(f'not a seed enc_dec state_dict: missing key {key!r}')
    got = tuple(state_dict[key].shape)
    if got != shape:
      raise UserError(f'not a seed enc_dec state_dict: {key!r} has shape {got}, expected {shape}')
  extra = sorted(set(state_dict) - set(expected))
  if extra:
    raise UserError(f'not a seed enc_dec state_dict: unexpected key {extra[0]!r}')

  as_np = lambda t: np.asarray(t.detach().cpu().numpy() if hasattr(t, 'detach') else t, np.float32)
  params, batch_stats = {}, {}
  for key in expected:
    module, attr = key.rsplit('.', 1)
    name = module.replace('.', '_')
    value = state_dict[key]
    if attr == 'weight' and len(value.shape) == 4:  # conv: (out, in, kh, kw) -> (kh, kw, in, out)
      params.setdefault(name, {})['kernel'] = as_np(value).transpose(2, 3, 1, 0)
    elif attr == 'weight':  # BatchNorm gamma
      params.setdefault(name, {})['scale'] = as_np(value)
    elif attr == 'bias':
      params.setdefault(name, {})['bias'] = as_np(value)
    elif attr == 'running_mean':
      batch_stats.setdefault(name, {})['mean'] = as_np(value)
    elif attr == 'running_var':
      batch_stats.setdefault(name, {})['var'] = as_np(value)
    # num_batches_tracked has no Flax counterpart (momentum is fixed).
  return embedding_dim, {'params': params, 'batch_stats': batch_stats}


def load_torch_checkpoint(path):
  """A prototype `.pth` -> (model, variables), for
  `model.apply(variables, L, embedding, train=False)`.

  L: (B, H, W, 1) = L*/100 in [0, 1]; embedding: (B, 1000); returns (B, H, W, 2) = ab/128.
  """
  import torch

  path = os.path.expanduser(str(path))
  if os.path.isdir(path):
    raise UserError(f'{path} is a folder; give the PyTorch checkpoint file (.pth) itself')
  if not os.path.isfile(path):
    raise UserError(f'no such checkpoint file: {path}')
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickles with code in them, truncated or non-torch files
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'{path} is not a loadable PyTorch state_dict ({first})') from None
  embedding_dim, variables = torch_to_flax(state_dict)
  return model_lib.Colorizer(embedding_dim=embedding_dim), variables
