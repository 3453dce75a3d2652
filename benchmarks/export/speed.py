"""The exported model against colorflax's own inference: images/s of the whole colorizer
(Inception-v3 + the seed model, 7,142,984 parameters) at one size, on this machine's CPU.

  python benchmarks/export/speed.py [--size 256] [--json benchmarks/export/speed_cpu.json]

Weights are random (the seed's architecture, converted by convert_torch; a random Inception-v3
saved as a weights file): speed does not depend on their values. Both sides start from the
grayscale squares already at the model's size, so they time the same work:
- onnxruntime: one InferenceSession.run of colorizer.onnx (default threads);
- colorflax: Colorizer.colorize_batch, i.e. Inception in torch and the jitted Flax model.
Each figure is the median of --repeats timed runs after two warm-up runs.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def _median_rate(fn, images, repeats):
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return images / statistics.median(times)


def _cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.machine()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  import onnxruntime as ort
  import torch
  import torchvision

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  from colorflax import checkpoints, colorizer, convert_torch, export
  from colorflax.reference.torch_model import EncDec

  tmp = tempfile.mkdtemp(prefix='colorflax-export-speed-')
  torch.manual_seed(0)
  torch.save(EncDec().state_dict(), os.path.join(tmp, 'seed.pth'))
  inception_file = os.path.join(tmp, 'inception.pth')
  torch.save(
      torchvision.models.inception_v3(weights=None, init_weights=True).state_dict(), inception_file
  )
  work = os.path.join(tmp, 'run')
  convert_torch.convert(os.path.join(tmp, 'seed.pth'), work)
  config = checkpoints.read_config(work)
  config.features.inception_weights = inception_file
  out = os.path.join(tmp, 'onnx')
  start = time.perf_counter()
  export.export(work, config, out, size=args.size, inception_weights=inception_file)
  export_s = time.perf_counter() - start

  session = ort.InferenceSession(os.path.join(out, 'colorizer.onnx'))
  predictor = colorizer.Colorizer(work, config, size=args.size, inception_weights=inception_file)
  rng = np.random.default_rng(0)
  results = {
      'size': args.size,
      'onnx_mb': round(os.path.getsize(os.path.join(out, 'colorizer.onnx')) / 2**20, 1),
      'export_s': round(export_s, 1),
      'machine': _cpu_name(),
      'cpus': os.cpu_count(),
      'versions': {
          'onnxruntime': ort.__version__,
          'torch': torch.__version__,
          'jax': __import__('jax').__version__,
      },
      'batches': {},
  }
  for b in (int(x) for x in args.batches.split(',')):
    grays = rng.uniform(0, 1, (b, args.size, args.size)).astype(np.float32)
    feeds = {'gray': grays[..., None], 'inception_gray': grays[..., None]}
    onnx = _median_rate(lambda: session.run(['ab'], feeds), b, args.repeats)
    jax_rate = _median_rate(lambda: predictor.colorize_batch(list(grays)), b, args.repeats)
    results['batches'][b] = {
        'onnxruntime_img_s': round(onnx, 2),
        'colorflax_img_s': round(jax_rate, 2),
    }
    print(
        f'batch {b}: onnxruntime {onnx:.2f} img/s, colorflax (torch Inception + JAX) '
        f'{jax_rate:.2f} img/s'
    )
  print(json.dumps(results, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
