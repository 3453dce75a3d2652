"""The seed recipe (SPEC §2): 256 px, batch 8, 60 epochs, Adam 1e-3, plateau on validation loss.

Every other config imports this one and overrides a few fields. Any field can be overridden on
the command line: `--config configs/default.py --config.data.source='/data/landscape Images/color'`.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.data = ml_collections.ConfigDict()
  # A folder of images (searched recursively), 'tfds:NAME[:SPLIT]', or 'synthetic' (the
  # built-in procedural landscapes).
  config.data.source = 'synthetic'
  config.data.synthetic_images = 7000  # how many images the 'synthetic' source generates
  config.data.cache_dir = 'cache/default'  # where precompute_features writes, train reads
  config.data.image_size = 256
  config.data.resize = 'squash'  # 'squash' (area filter, aspect ignored: the seed) | 'center_crop'
  config.data.val_fraction = 0.25
  config.data.skip_grayscale = True  # grayscale-only images hold no colour to learn
  config.data.max_image_pixels = 89_478_485  # larger images are skipped (decompression bombs)
  config.data.tfds_data_dir = ''  # '' = TFDS's default (~/tensorflow_datasets)
  config.data.tfds_image_key = 'image'

  config.features = ml_collections.ConfigDict()
  config.features.kind = 'logits'  # 'logits' (1000, the seed) | 'probs' (1000) | 'pool' (2048)
  # 'auto' (ImageNet if it can be had, else random), 'imagenet', 'random', or a .pth path.
  config.features.inception_weights = 'auto'
  config.features.batch_size = 32
  config.features.num_workers = 0  # decoding processes; 0 = one per core
  config.features.calibration_images = 256  # 'random' weights: BatchNorm statistics from these

  config.model = ml_collections.ConfigDict()
  config.model.width = 1.0  # multiplies every hidden layer's channels; 1.0 is the seed
  config.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)

  config.batch_size = 8  # global, over all devices
  config.num_epochs = 60
  config.learning_rate = 1e-3

  config.augment = ml_collections.ConfigDict()
  config.augment.rotation_degrees = 20.0
  config.augment.shear = 0.2
  config.augment.flip_probability = 0.5

  # torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', patience=10, factor=0.1), stepped
  # on the validation loss once per epoch.
  config.plateau = ml_collections.ConfigDict()
  config.plateau.factor = 0.1
  config.plateau.patience = 10
  config.plateau.threshold = 1e-4  # relative, as torch's default threshold_mode='rel'
  config.plateau.cooldown = 0
  config.plateau.min_scale = 0.0

  return config
