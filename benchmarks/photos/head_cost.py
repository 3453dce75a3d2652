"""What the classification head costs: the seed recipe's training step (configs/default.py, 256 px,
batch 8) with each loss, timed as `colorflax.benchmark` times it (measurements.jax_step), with
XLA's FLOP count and the compiled step's temporary memory (activations and gradients).

  python benchmarks/photos/head_cost.py [--size 256] [--batch 8] [--repeats 3] [--json OUT]
"""

import argparse
import json

import jax
import numpy as np

from colorflax import distributed, measurements, train_step
from colorflax import model as model_lib
from configs import default


def temp_bytes(config):
  """The compiled single training step's temporary buffers, in bytes (XLA's memory analysis)."""
  devices = distributed.run_devices(config)
  mesh = distributed.data_mesh(devices)
  replicated = distributed.replicated(mesh)
  model = model_lib.model_from_config(config)
  tx, plateau = train_step.make_optimizer(config)
  state = train_step.create_state(config, model, tx, plateau, replicated)
  s, b = config.data.image_size, config.batch_size
  images = np.zeros((b, s, s, 3), np.uint8)
  emb = np.zeros((b, model.embedding_dim), np.float32)
  idx = np.zeros((1, b), np.int32)
  lowered = train_step.make_train_step(model, tx, config).lower(state, (images, emb), idx, 0)
  return lowered.compile().memory_analysis().temp_size_in_bytes, model_lib.count_params(
      state.params
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json')
  args = parser.parse_args()
  results = {}
  for loss in ('mse', 'classification'):
    config = default.get_config()
    config.loss, config.data.image_size, config.batch_size = loss, args.size, args.batch
    config.steps_per_dispatch = 1
    step = measurements.jax_step(config, args.repeats)
    temp, params = temp_bytes(config)
    results[loss] = {
        'step_seconds': step['jax_step_seconds'],
        'images_per_sec': step['jax_step_images_per_sec'],
        'gflops_per_image': step['flops_per_image'] / 1e9,
        'step_temp_bytes': temp,
        'params': params,
        'device': step['device'],
    }
    print(
        f'{loss:>14}: {params:,} parameters, {step["jax_step_seconds"]:.3f} s/step '
        f'({step["jax_step_images_per_sec"]:.1f} img/s), {step["flops_per_image"] / 1e9:.1f} '
        f'GFLOP/image, step temporaries {temp / 2**20:.0f} MiB ({step["device"]}, '
        f'{args.size} px, batch {args.batch})'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'jax': jax.__version__, **results}, f, indent=2)


if __name__ == '__main__':
  main()
