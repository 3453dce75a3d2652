"""Real photographs on one machine: what this project recommends, chosen by measurement on the
development set's held-out photographs (benchmarks/photos/compare.sh; README "Real photographs").

  python -m colorflax.precompute_features --config configs/photos.py \
      --config.data.source=/path/to/photos
  python -m colorflax.train --config configs/photos.py --workdir workdirs/photos \
      --config.data.source=/path/to/photos

The classification loss with a weight average was the only run near the photographs'
colourfulness (-4.7 at T = 0.38, MSE -24.5) and had a quarter of MSE's FID; on 21 training
scenes its colours are often wrong (3 dB below MSE's PSNR): `--temperature 1.0` at evaluate and
colorize is the safer end, `--config.loss=mse` the faithful, washed-out one.

64 px and a half-width model keep a CPU run to minutes; on a GPU raise image_size (the seed's
256) and model.width (1.0) together, and the epochs with the photographs' number.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'photos'  # a folder of colour photographs (searched recursively)
  config.data.cache_dir = 'cache/photos'
  config.data.image_size = 64
  config.data.resize = 'center_crop'  # photographs keep their proportions
  config.features.inception_weights = 'auto'  # ImageNet's; offline: a .pth path (or 'random')
  config.model.width = 0.5
  config.batch_size = 16
  config.num_epochs = 60
  config.plateau.patience = 5
  config.loss = 'classification'
  config.classification.temperature = 0.38
  config.ema_decay = 0.99
  return config
