"""colorflax: automatic image colorization in JAX/Flax (README.md).

The data flow, one module each: sources -> precompute_features (decoding, inception,
cache_writer) -> features_cache -> device_pipeline / streaming (augment, color) -> model
(layers) -> train (train_step, losses, checkpoints) -> evaluate, colorize (colorizer, video);
benchmark measures it.
"""

from colorflax import xla_flags as _xla_flags

_xla_flags.apply_defaults()  # before any colorflax module lets JAX start its backends
