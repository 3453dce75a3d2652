"""The seed recipe (SPEC §2): 256 px, batch 8, 60 epochs, Adam 1e-3, plateau on validation loss.

Every other config imports this one and overrides a few fields. Any field can be overridden on
the command line: `--config configs/default.py --config.data.source='/data/landscape Images/color'`.
"""

import ml_collections

from colorflax import image_io


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
  config.data.max_image_pixels = (
      image_io.DEFAULT_MAX_PIXELS
  )  # larger are skipped (decompression bombs)
  config.data.tfds_data_dir = ''  # '' = TFDS's default (~/tensorflow_datasets)
  config.data.tfds_image_key = 'image'

  config.features = ml_collections.ConfigDict()
  config.features.kind = 'logits'  # 'logits' (1000, the seed) | 'probs' (1000) | 'pool' (2048)
  # 'auto' (ImageNet if it can be had, else random), 'imagenet', 'random', or a .pth path.
  config.features.inception_weights = 'auto'
  config.features.batch_size = 32
  config.features.num_workers = 0  # decoding processes; 0 = one per core
  config.features.calibration_images = 256  # 'random' weights: BatchNorm statistics from these
  # Sharded precompute (one process or machine per shard), then `--merge`: see launch/.
  config.features.num_shards = 1
  config.features.shard_index = 0

  config.model = ml_collections.ConfigDict()
  config.model.width = 1.0  # multiplies every hidden layer's channels; 1.0 is the seed
  config.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
  # dec3_0 with its upsampled half on the low-res grid (7.5 % fewer FLOPs, same function):
  # 'auto' (on a single CPU device), 'true' or 'false'.
  config.model.polyphase_dec3 = 'auto'
  # Colour hints (colorflax.hints; Zhang et al. 2017): the model also takes points of known
  # colour (colorize --hints, evaluate --hints), and training simulates a user giving them.
  config.model.hints = False
  config.hints = ml_collections.ConfigDict()
  config.hints.p = 0.125  # points per training image ~ geometric: P(none) = p, mean (1 - p) / p
  config.hints.max_points = 32  # at most this many (the step's static shape)
  config.hints.max_patch = 9  # each a square patch of 1 to this many px a side, of its mean ab

  config.data.placement = (
      'auto'  # 'resident' (on the devices) | 'streaming' | 'auto' (resident if it fits)
  )
  config.data.device_budget_fraction = 0.5  # 'auto': at most this share of free device memory
  # 'streaming': grain reads each process's slice of every batch from the memory-mapped cache.
  config.data.stream_workers = 0  # grain worker processes (0 = threads in the training process)
  config.data.stream_threads = 4  # reading threads (per worker process, if any)
  config.data.stream_prefetch = 16  # steps read ahead (per worker process, if any)

  config.num_devices = 0  # use the first N devices of each process (0 = all of them)
  config.batch_size = 8  # global, over all devices
  config.per_device_batch_size = (
      0  # if > 0: global batch = this x device count (batch_size ignored)
  )
  config.eval_batch_size = 0  # 0 = the training batch
  config.steps_per_dispatch = 8  # optimizer steps per host dispatch (one lax.scan)
  config.step_loop = (
      'auto'  # the K steps: 'device' (lax.scan) | 'host' | 'auto' (host on CPU, device elsewhere)
  )
  config.num_epochs = 60
  config.learning_rate = 1e-3

  # The objective (colorflax.losses): 'mse' (the seed's), 'l1', 'huber' or 'classification'
  # (Zhang et al. 2016: a distribution over ab bins, rebalanced towards rare colours).
  config.loss = 'mse'
  config.huber_delta = 0.05  # 'huber': where its quadratic part ends, in ab/128 units
  config.classification = ml_collections.ConfigDict()
  config.classification.temperature = 0.38  # the annealed mean's (evaluate/colorize --temperature)
  config.classification.neighbours = 5  # soft encoding of the true ab over its nearest bins
  config.classification.sigma = 5.0  # ... with a Gaussian of this width (Lab units)
  config.classification.prior_sigma = 5.0  # smoothing of the training colours' distribution
  config.classification.rebalance = 0.5  # lambda: the uniform share mixed into it
  # > 0: an exponential moving average of the weights (this decay per step) is what validation,
  # the best checkpoint, evaluate and colorize use.
  config.ema_decay = 0.0

  config.augment = ml_collections.ConfigDict()
  config.augment.rotation_degrees = 20.0
  config.augment.shear = 0.2
  config.augment.flip_probability = 0.5
  config.augment.fill_mode = (
      'nearest'  # outside the warped image: 'nearest' edge | 'constant' black
  )

  # torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', patience=10, factor=0.1), stepped
  # on the validation loss once per epoch.
  config.plateau = ml_collections.ConfigDict()
  config.plateau.factor = 0.1
  config.plateau.patience = 10
  config.plateau.threshold = 1e-4  # relative, as torch's default threshold_mode='rel'
  config.plateau.cooldown = 0
  config.plateau.min_scale = 0.0

  # Fine-tuning: a new run starts from the weights (parameters and BatchNorm statistics) of
  # another workdir's checkpoint, a training run's or an imported prototype's (convert_torch),
  # with a fresh optimizer at step 0. Same model width and feature kind; any image size, data or
  # recipe. Once this run has a checkpoint of its own, resuming from it wins.
  config.init_from = ''  # a workdir; '' = random initialisation
  config.init_checkpoint = 'best'  # which of its checkpoints: 'best', 'latest' or a step number
  config.checkpoint_every_steps = 0  # also checkpoint mid-epoch every N steps (0 = epochs only)
  config.keep_checkpoints = 3  # the latest K are kept, and the best by validation loss
  config.samples_every_epochs = 5  # write DIR/samples/epoch_XXXX.png (and after the last epoch)
  config.num_samples = 8  # validation images in the sample grid
  # Multi-process: jax.distributed.initialize(). On SLURM and Cloud TPU the coordinator, process
  # count and id are found from the environment; elsewhere give them here.
  config.distributed = False
  config.coordinator_address = ''  # e.g. 'host0:1234'
  config.num_processes = 0
  config.process_id = -1

  return config
