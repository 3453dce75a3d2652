"""The PyTorch side of `colorflax.benchmark`: the reference model's training step, PyTorch's
matmul peak, and a whole epoch of a seed-style pipeline (host augmentation, per-batch Lab with
scikit-image, Inception-v3 on every batch). Imported only by the benchmark's child processes.
"""

import os
import time

import numpy as np
import torch

from colorflax import timing
from colorflax.model import EMBEDDING_DIMS
from colorflax.reference.torch_model import EncDec


def torch_step(config, repeats):
  """The PyTorch reference (same model, init scheme, Adam, MSE), channels_last, AMP bf16 if
  asked."""
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.set_num_threads(os.cpu_count() or 1)
  if config.model.width != 1.0:
    return {}  # the reference exists at the seed's width only
  s, b = config.data.image_size, config.batch_size
  model = EncDec(EMBEDDING_DIMS[config.features.kind]).to(dev, memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  L = torch.rand(b, 1, s, s, device=dev).to(memory_format=torch.channels_last)
  e = torch.randn(b, model.dec1[0].in_channels - 256, device=dev)
  ab = torch.rand(b, 2, s, s, device=dev) * 2 - 1
  amp = config.model.dtype == 'bfloat16'

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      loss = torch.nn.functional.mse_loss(model(L, e).float(), ab)
    loss.backward()
    opt.step()
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  for _ in range(3):
    run()
  seconds = timing.median_time(run, repeats)
  out = {'torch_step_seconds': seconds, 'torch_step_images_per_sec': b / seconds}
  if dev.type == 'cuda':
    out['torch_step_peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  return out


def torch_matmul_peak(dtype_name, repeats):
  """The same through PyTorch: on CPUs with AMX its oneDNN reaches bf16 speeds XLA:CPU does not,
  and the device's peak is what the best library on it reaches."""
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype_name]
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.set_num_threads(os.cpu_count() or 1)

  def matmul(n):
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    return lambda: (a @ b, sync())

  return {
      'torch_matmul_peak_flops': timing.best_matmul_flops(
          matmul, timing.matmul_sizes(dev.type), repeats
      )
  }


class SeedDataset:
  """The prototype's input pipeline over a cache's images: PIL image -> torchvision RandomAffine
  (rotation, shear) + horizontal flip on the host -> float tensor in [0, 1] (HWC)."""

  def __init__(self, images, config):
    import torchvision.transforms as T

    a = config.augment
    self.images = images
    shear = float(np.degrees(np.arctan(a.shear)))  # torchvision takes shear in degrees
    self.transform = T.Compose(
        [
            T.RandomAffine(a.rotation_degrees, shear=shear),
            T.RandomHorizontalFlip(a.flip_probability),
        ]
    )

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    from PIL import Image

    image = self.transform(Image.fromarray(np.asarray(self.images[i])))
    return np.asarray(image, np.float32) / 255.0


def _seed_step(config, dev):
  """step(rgb batch) -> the compute dtype: the prototype's per-batch work, Lab on the host,
  Inception-v3 on the batch, then the reference model's forward, backward and Adam."""
  import torchvision
  from skimage import color as skcolor

  inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
  inception = inception.to(dev).eval()
  model = EncDec(1000).to(dev)
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  amp = config.model.dtype == 'bfloat16'

  def step(rgb):
    lab = skcolor.rgb2lab(rgb.numpy())  # per batch, on the host
    L = torch.from_numpy(lab[..., :1] / 100.0).float().permute(0, 3, 1, 2).to(dev)
    ab = torch.from_numpy(lab[..., 1:] / 128.0).float().permute(0, 3, 1, 2).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      with torch.no_grad():
        gray = L.expand(-1, 3, -1, -1)
        if gray.shape[-1] < 75:  # Inception-v3's smallest input
          gray = torch.nn.functional.interpolate(gray, size=(75, 75), mode='bilinear')
        embedding = inception(gray)
      opt.zero_grad(set_to_none=True)
      prediction = model(L, embedding)
      loss = torch.nn.functional.mse_loss(prediction.float(), ab)
    loss.backward()
    opt.step()
    return prediction.dtype

  return step


def seed_pipeline_epoch(config, cache_dir, train_rows, max_images=0):
  """One epoch of a seed-style PyTorch training loop over the cache's training images: host
  augmentation in a DataLoader, per-batch RGB->Lab with scikit-image, Inception-v3 recomputed on
  every batch (grayscale stacked x3 at the training size, as the prototype did), then the
  reference model's forward/backward/Adam step (channels-first as the prototype; float32, or
  AMP bfloat16 when the config's dtype is bfloat16, as the PyTorch step). `max_images` > 0
  stops the timing after that many images (whole batches)."""
  if config.model.width != 1.0:
    return {}  # the reference exists at the seed's width only
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  images = np.load(os.path.join(cache_dir, 'images.npy'), mmap_mode='r')
  dataset = SeedDataset(images[np.sort(train_rows)], config)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=config.batch_size, shuffle=True, drop_last=True
  )
  step = _seed_step(config, dev)
  batches = iter(loader)
  compute_dtype = step(next(batches))  # warm-up (allocator, thread pools)
  if dev.type == 'cuda':
    torch.cuda.synchronize()
  t, n = time.perf_counter(), 0
  for rgb in batches:
    step(rgb)
    n += len(rgb)
    if max_images and n >= max_images:
      break  # before loading a batch that would not be counted
  if dev.type == 'cuda':
    torch.cuda.synchronize()
  out = {
      'seed_pipeline_epoch_images_per_sec': n / (time.perf_counter() - t),
      'seed_pipeline_epoch_images': n,
      'seed_pipeline_compute_dtype': str(compute_dtype).removeprefix('torch.'),
  }
  if dev.type == 'cuda':
    out['seed_pipeline_peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  return out
