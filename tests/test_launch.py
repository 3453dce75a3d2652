import glob
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    glob.glob(os.path.join(REPO, 'launch', '*.sh'))
    + glob.glob(os.path.join(REPO, 'launch', '*.slurm'))
)


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_launch_scripts_parse(script):
  assert subprocess.run(['bash', '-n', script], capture_output=True).returncode == 0


def _dry(script, *args, **env):
  return subprocess.run(
      ['bash', os.path.join(REPO, 'launch', script), *args],
      capture_output=True,
      text=True,
      env={**os.environ, 'DRY_RUN': '1', **env},
      cwd=REPO,
  )


@pytest.mark.parametrize(
    'script, args, env',
    [
        ('local.sh', ('my configs/default.py', 'work dirs/run'), {}),
        (
            'precompute_sharded.slurm',
            ('my configs/default.py',),
            {'SLURM_ARRAY_TASK_ID': '0', 'SLURM_ARRAY_TASK_COUNT': '2'},
        ),
        (
            'train_multinode.slurm',
            ('my configs/default.py', 'work dirs/run'),
            {'SLURM_JOB_ID': '7'},
        ),
        ('gpu_benchmark.sh', ('/tmp/gpu out',), {}),
    ],
    ids=['local.sh', 'precompute_sharded.slurm', 'train_multinode.slurm', 'gpu_benchmark.sh'],
)
def test_dry_run_prints_commands_that_read_back_as_the_same_words(script, args, env):
  """What DRY_RUN prints is what a user copies: an argument with a space must stay one word."""
  override = '--config.data.source=/data/my photos'
  r = _dry(script, *args, override, **env)
  assert r.returncode == 0, r.stderr
  for line in r.stdout.strip().splitlines():
    words = shlex.split(line)
    assert words[-1] == override, line
    # No argument with a space was cut in two: its part before the space would be a word.
    assert not [arg for arg in (*args, override) if arg.split(' ')[0] in words], line


def test_local_dry_run_passes_overrides_to_every_step():
  r = _dry('local.sh', 'configs/quickstart.py', 'workdirs/q', '--config.data.image_size=32')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert [l.split()[2] for l in lines] == [
      'colorflax.precompute_features',
      'colorflax.train',
      'colorflax.evaluate',
  ]
  assert all(l.endswith('--config.data.image_size=32') for l in lines)
  assert _dry('local.sh', 'configs/quickstart.py').returncode == 2


def test_sharded_precompute_dry_run():
  r = _dry(
      'precompute_sharded.slurm',
      'configs/default.py',
      '--config.data.source=/data/photos',
      SLURM_ARRAY_TASK_ID='3',
      SLURM_ARRAY_TASK_COUNT='8',
      SLURM_CPUS_PER_TASK='6',
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == [
      'python',
      '-m',
      'colorflax.precompute_features',
      '--config',
      'configs/default.py',
      '--config.features.num_shards=8',
      '--config.features.shard_index=3',
      '--config.features.num_workers=6',
      '--config.data.source=/data/photos',
  ]
  outside_slurm = _dry('precompute_sharded.slurm', 'configs/default.py')
  assert outside_slurm.returncode != 0 and 'array job' in outside_slurm.stderr


def test_multinode_slurm_dry_run():
  r = _dry(
      'train_multinode.slurm',
      'configs/default.py',
      '/shared/run',
      '--config.per_device_batch_size=8',
      SLURM_JOB_ID='7',
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == [
      'srun',
      '--kill-on-bad-exit=1',
      'python',
      '-m',
      'colorflax.train',
      '--config',
      'configs/default.py',
      '--workdir',
      '/shared/run',
      '--config.distributed=True',
      '--config.per_device_batch_size=8',
  ]
  # One process per node drives all of the node's GPUs.
  r = _dry(
      'train_multinode.slurm',
      'configs/default.py',
      '/shared/run',
      SLURM_JOB_ID='7',
      PROCESS_PER='node',
      SLURM_GPUS_ON_NODE='4',
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun ')
  assert (
      _dry(
          'train_multinode.slurm',
          'configs/default.py',
          '/shared/run',
          SLURM_JOB_ID='7',
          PROCESS_PER='socket',
      ).returncode
      == 2
  )
  outside = _dry('train_multinode.slurm', 'configs/default.py', '/shared/run')
  assert outside.returncode != 0 and 'sbatch' in outside.stderr


def test_tpu_pod_dry_run_runs_one_command_on_every_worker():
  r = _dry(
      'tpu_pod.sh',
      'configs/default.py',
      '/mnt/shared/run',
      '--config.data.source=/data/my photos',
      TPU_NAME='pod',
      ZONE='us-central2-b',
      INSTALL='1',
      PROJECT='proj',
  )
  assert r.returncode == 0, r.stderr
  install, train_cmd = r.stdout.strip().splitlines()
  prefix = (
      'gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --project proj --worker=all '
      '--command '
  )
  assert install.startswith(prefix) and "pip install -q -e '.[tpu]'" in install
  assert train_cmd == prefix + (
      'cd ~/colorflax && python3 -m colorflax.train --config configs/default.py '
      '--workdir /mnt/shared/run --config.distributed=True '
      '--config.data.source=/data/my\\ photos'
  )
  # The remote command line is valid shell and keeps the override with a space as one argument.
  remote = train_cmd[len(prefix) :]
  words = subprocess.run(
      ['bash', '-c', 'for w in ' + remote.split(' && ')[1] + '; do echo "[$w]"; done'],
      capture_output=True,
      text=True,
  ).stdout.splitlines()
  assert words[-1] == '[--config.data.source=/data/my photos]'
  missing = _dry('tpu_pod.sh', 'configs/default.py', '/mnt/shared/run', ZONE='z')
  assert missing.returncode != 0 and 'TPU_NAME' in missing.stderr


def test_gpu_benchmark_commands_parse():
  """The GPU script runs when a GPU is lent for a few minutes: every flag it passes must exist."""
  r = _dry(
      'gpu_benchmark.sh', '/tmp/gpu-out', STAGES='seed_f32_b8 seed_bf16_b8 bf16_b128 recipe_bf16_b8'
  )
  assert r.returncode == 0, r.stderr
  commands = [line.split() for line in r.stdout.strip().splitlines()]
  assert len(commands) == 4 and all(
      c[:3] == ['python3', '-m', 'colorflax.benchmark'] for c in commands
  )
  check = (
      'import sys\n'
      'from colorflax import benchmark, cli\n'
      'f = cli.build_flags(benchmark.define_flags)\n'
      'f(sys.argv)\n'
      'c = cli.load_config(f)\n'
      'print(c.model.dtype, c.batch_size, f.epoch_images, f.seed_epoch_images, f.recipe_epochs,'
      ' f.torch)\n'
  )
  parsed = [
      subprocess.run(
          [sys.executable, '-c', check, *c[3:]], capture_output=True, text=True, cwd=REPO
      )
      for c in commands
  ]
  assert all(p.returncode == 0 for p in parsed), [p.stderr[-500:] for p in parsed]
  assert [p.stdout.split() for p in parsed] == [
      ['float32', '8', '7000', '1600', '0', 'True'],
      ['bfloat16', '8', '7000', '1600', '0', 'True'],
      ['bfloat16', '128', '0', '0', '0', 'True'],
      ['bfloat16', '8', '7000', '0', '60', 'False'],
  ]  # the seed recipe: 60 epochs of 7,000 images, timed whole
  # Flags after OUTDIR reach every command after the script's own, so they win (a rehearsal at a
  # small size, or a smaller GPU); without OUTDIR they are still flags, and $OUT names the folder.
  r = _dry('gpu_benchmark.sh', '--config.batch_size=16', '--epoch_images=96', OUT='/tmp/rehearsal')
  assert r.returncode == 0, r.stderr
  commands = [line.split() for line in r.stdout.strip().splitlines()]
  assert all(c[-2:] == ['--config.batch_size=16', '--epoch_images=96'] for c in commands)
  # By default the three settings that fit one 10-minute call on a GPU; the whole recipe on request.
  assert [c[6] for c in commands] == [
      f'/tmp/rehearsal/{n}.json' for n in ('seed_f32_b8', 'seed_bf16_b8', 'bf16_b128')
  ]
  parsed = subprocess.run(
      [sys.executable, '-c', check, *commands[2][3:]], capture_output=True, text=True, cwd=REPO
  )
  assert parsed.stdout.split() == ['bfloat16', '16', '96', '0', '0', 'True'], parsed.stderr[-500:]
  # STAGES picks settings by name, e.g. to finish in a second call what the first had no time for.
  r = _dry('gpu_benchmark.sh', '/tmp/gpu-out', STAGES='bf16_b128 recipe_bf16_b8')
  assert [line.split()[6] for line in r.stdout.strip().splitlines()] == [
      '/tmp/gpu-out/bf16_b128.json',
      '/tmp/gpu-out/recipe_bf16_b8.json',
  ]
  r = _dry('gpu_benchmark.sh', STAGES='bf16_b128 recipe_bf16')
  assert (
      r.returncode == 2
      and r.stdout == ''
      and r.stderr.splitlines()
      == [
          "gpu_benchmark.sh: STAGES: unknown setting 'recipe_bf16'; the settings are: "
          'seed_f32_b8 seed_bf16_b8 bf16_b128 recipe_bf16_b8'
      ]
  )
