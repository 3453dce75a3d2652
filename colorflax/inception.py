"""Inception-v3 global features in torch/torchvision (used by precompute_features and colorize).

Input convention (SPEC §2, fixing the prototype's bugs): the luminance grayscale of the resized
image, stacked x3, resized to 299, ImageNet-normalised, eval mode, no augmentation.
"""

import io
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import Inception_V3_Weights, inception_v3

from colorflax.color import GRAY_WEIGHTS
from colorflax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 299
CALIBRATION_FILE = 'inception_batchnorm.pth'  # calibrated statistics of 'random' weights


def device():
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def to_device(model):
  """The model on the GPU if there is one, channels-last (about 1.4x faster on CPU: measured)."""
  return model.to(device(), memory_format=torch.channels_last)


def preprocess(images_uint8, colour=False) -> torch.Tensor:
  """uint8 (B, S, S, 3) RGB, or (B, S, S) grayscale -> the (B, 3, 299, 299) network input: the
  grayscale stacked x3 (the colorizer's global feature), or with `colour` the RGB itself (FID)."""
  x = torch.from_numpy(np.array(images_uint8, np.float32)) / 255.0
  if colour:
    x = x.permute(0, 3, 1, 2)
  else:
    if x.ndim == 4:
      x = (x * torch.tensor(GRAY_WEIGHTS, dtype=x.dtype)).sum(-1)
    x = x[:, None]
  x = F.interpolate(
      x, size=(INPUT_SIZE, INPUT_SIZE), mode='bilinear', align_corners=False, antialias=True
  )
  x = x.expand(-1, 3, -1, -1)
  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  return (x - mean) / std


def _architecture():
  # The IMAGENET1K_V1 architecture: transform_input maps ImageNet normalisation to the
  # network's own (x - 0.5) / 0.5 convention, as torchvision does for the pretrained weights.
  return inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)


def load_model(weights: str, seed: int = 0):
  """(model in eval mode, what was loaded as a string). `weights`: 'imagenet', 'random',
  'auto' or a path to a torchvision-format state_dict. 'random' still needs calibration."""
  if weights in ('imagenet', 'auto'):
    try:
      model = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
      return model.eval(), 'imagenet:IMAGENET1K_V1'
    except Exception as e:  # offline, blocked, corrupt cache
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if weights == 'imagenet':
        raise UserError(
            'features.inception_weights=imagenet: could not load torchvision IMAGENET1K_V1 '
            f'({reason}). '
            f'Offline? Copy {Inception_V3_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]} into '
            f'{os.path.join(torch.hub.get_dir(), "checkpoints")} or pass its path'
        ) from None
      bar = '!' * 78
      print(
          f'{bar}\nWARNING: could not load ImageNet Inception-v3 weights ({reason}).\n'
          f'Falling back to RANDOM weights (calibrated). Features will carry little semantic '
          f'information;\nset features.inception_weights to a .pth path for real use.\n{bar}',
          file=sys.stderr,
      )
      weights = 'random'
  torch.manual_seed(seed)
  model = _architecture()
  if weights == 'random':
    return model.eval(), f'random(seed={seed})'
  path = os.path.expanduser(weights)
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(
        state_dict, dict
    ):  # name the first mismatch: load_state_dict's text lists them all
      names = set(model.state_dict())
      missing, unexpected = sorted(names - set(state_dict)), sorted(set(state_dict) - names)
      if missing or unexpected:
        raise ValueError(
            f'{len(missing)} missing keys, {len(unexpected)} unexpected, e.g. '
            + (f'no {missing[0]!r}' if missing else f'{unexpected[0]!r}')
        )
    model.load_state_dict(state_dict)
  except FileNotFoundError:
    raise UserError(f'features.inception_weights: no such file: {weights}') from None
  except Exception as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    first = lines[1] if lines[0].startswith('Error(s) in loading') and len(lines) > 1 else lines[0]
    raise UserError(
        f'features.inception_weights: {weights} is not a torchvision Inception-v3 '
        f'state_dict ({first})'
    ) from None
  return model.eval(), f'file:{os.path.abspath(path)}'


@torch.inference_mode()
def calibrate(model, batches):
  """Re-estimate every BatchNorm's running statistics from `batches` of network inputs.

  A freshly initialised Inception-v3 keeps mean 0 / var 1 statistics, and in eval mode its
  logits reach ~1e11. Forward passes in train mode with momentum=None (a cumulative average)
  give statistics of real activations, and features of a sane scale.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
  model.train()
  dev = next(model.parameters()).device
  for x in batches:
    if len(x) == 1:  # train-mode BatchNorm needs 2 values per channel (the aux head's maps are 1x1)
      x = torch.cat([x, x])
    model(x.to(dev, memory_format=torch.channels_last))
  for bn in bns:
    bn.momentum = 0.1
  return model.eval()


def save_batchnorm_stats(model, path):
  """The BatchNorm running statistics (a few hundred KB), which calibration changed."""
  stats = {
      k: v.detach().cpu()
      for k, v in model.state_dict().items()
      if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  }
  buffer = io.BytesIO()  # torch.save's own failed writes are RuntimeErrors; a file's are OSErrors
  torch.save(stats, buffer)
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())


def load_for_cache(manifest, cache_dir, override=None):
  """The network a cache's features came from (or `override`), ready in eval mode.

  'random(seed=S)' weights are rebuilt from their seed plus the statistics saved beside the cache.
  """
  recorded = manifest.get('inception_weights', '') if manifest else ''
  if override and override != 'auto':
    weights, seed = override, 0
  elif recorded.startswith('imagenet'):
    weights, seed = 'imagenet', 0
  elif recorded.startswith('file:'):
    weights, seed = recorded[len('file:') :], 0
  elif recorded.startswith('random(seed='):
    weights, seed = 'random', int(recorded[len('random(seed=') : -1])
  else:
    weights, seed = override or 'imagenet', 0
  model, used = load_model(weights, seed=seed)
  if used.startswith('random'):
    if manifest is None:  # the model needs the very network its cache was built with
      raise UserError(
          f'no features cache at {cache_dir}: the run was trained on features of calibrated random '
          'Inception weights, whose statistics are kept with that cache; point to it with '
          '--config.data.cache_dir=DIR'
      )
    stats_file = manifest.get('inception_calibration')
    if not stats_file or not cache_dir or not os.path.isfile(os.path.join(cache_dir, stats_file)):
      raise UserError(
          f'the cache at {cache_dir} has lost its calibrated Inception statistics '
          f'({stats_file or "not recorded"}), which its features came from; rebuild it: '
          'python -m colorflax.precompute_features --config CONFIG --overwrite'
      )
    stats = torch.load(os.path.join(cache_dir, stats_file), map_location='cpu', weights_only=True)
    model.load_state_dict(stats, strict=False)
  return to_device(model.eval()), used


@torch.inference_mode()
def embed(model, x: torch.Tensor, kind: str) -> np.ndarray:
  """Network input (B, 3, 299, 299) -> float32 (B, D): 'logits', 'probs' or 'pool' (2048)."""
  dev = next(model.parameters()).device
  x = x.to(dev, memory_format=torch.channels_last)
  fc = model.fc
  model.fc = torch.nn.Identity()  # the forward then ends at the 2048-d average pool
  try:
    pool = model(x)
  finally:
    model.fc = fc
  if kind == 'pool':
    out = pool
  else:
    out = fc(pool)
    if kind == 'probs':
      out = torch.softmax(out, dim=-1)
  return out.float().cpu().numpy()


def versions():
  return {'torch': torch.__version__, 'torchvision': torchvision.__version__}
