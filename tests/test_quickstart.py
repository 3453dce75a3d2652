"""The README's main command, smaller: the same CLI pipeline on held-out synthetic images."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_pipeline_beats_grayscale_baseline(tmp_path):
  small = [
      f'--config.data.cache_dir={tmp_path}/cache',
      '--config.data.synthetic_images=320',
      '--config.data.image_size=32',
      '--config.features.calibration_images=32',
      '--config.features.num_workers=1',
      '--config.num_epochs=6',
  ]
  env = {**os.environ, 'XLA_FLAGS': ''}  # one CPU device, as on a plain machine
  for cmd in (
      ['colorflax.precompute_features', '--config', 'configs/quickstart.py', *small],
      ['colorflax.train', '--config', 'configs/quickstart.py', f'--workdir={tmp_path}/run', *small],
  ):
    r = subprocess.run(
        [sys.executable, '-m', *cmd], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
  last = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
  assert last['epoch'] == 6
  # The validation split is held out: never trained on, never augmented.
  assert last['val_psnr'] > last['val_psnr_gray'] + 2.0, last
  assert (tmp_path / 'run' / 'samples' / 'epoch_0006.png').exists()
