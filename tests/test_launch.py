import glob
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh')) + glob.glob(os.path.join(REPO, 'launch', '*.slurm')))


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_launch_scripts_parse(script):
  assert subprocess.run(['bash', '-n', script], capture_output=True).returncode == 0


def _dry(script, *args, **env):
  return subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args], capture_output=True, text=True,
                        env={**os.environ, 'DRY_RUN': '1', **env}, cwd=REPO)


def test_local_dry_run_passes_overrides_to_every_step():
  r = _dry('local.sh', 'configs/quickstart.py', 'workdirs/q', '--config.data.image_size=32')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert [l.split()[2] for l in lines] == ['colorflax.precompute_features', 'colorflax.train', 'colorflax.evaluate']
  assert all(l.endswith('--config.data.image_size=32') for l in lines)
  assert _dry('local.sh', 'configs/quickstart.py').returncode == 2


def test_sharded_precompute_dry_run():
  r = _dry('precompute_sharded.slurm', 'configs/default.py', '--config.data.source=/data/photos',
           SLURM_ARRAY_TASK_ID='3', SLURM_ARRAY_TASK_COUNT='8', SLURM_CPUS_PER_TASK='6')
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ['python', '-m', 'colorflax.precompute_features', '--config', 'configs/default.py',
                              '--config.features.num_shards=8', '--config.features.shard_index=3',
                              '--config.features.num_workers=6', '--config.data.source=/data/photos']
  outside_slurm = _dry('precompute_sharded.slurm', 'configs/default.py')
  assert outside_slurm.returncode != 0 and 'array job' in outside_slurm.stderr
