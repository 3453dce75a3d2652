"""Two JAX processes on localhost, 2 fake CPU devices each, train like one process with 4."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from colorflax import precompute_features, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train import ROUNDING_LR, assert_params_alike, small_config  # noqa: E402

_PROCESS = """
import os, sys, ml_collections, numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
from colorflax import streaming, train
if __name__ == '__main__':  # grain's worker processes import this script again
  config = ml_collections.ConfigDict({config!r})
  config.process_id = int(sys.argv[1])
  state, last = train.train_and_evaluate(config, {workdir!r}, progress=False)
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.variables()))]
  if jax.process_index() == 0:
    np.savez({out!r}, *leaves)
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = streaming.process_positions(NamedSharding(mesh, P('data')), config.batch_size).tolist()
  print('process', jax.process_index(), 'of', jax.process_count(), 'devices', jax.device_count(),
        'reads batch positions', rows, flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def single_process_run(tmp_path_factory):
  """The reference: one process with 4 devices, data resident."""
  root = tmp_path_factory.mktemp('single')
  config = small_config(root / 'cache', num_epochs=2, learning_rate=ROUNDING_LR)
  precompute_features.precompute(config, progress=False)
  state, _ = train.train_and_evaluate(config, str(root / 'single'), progress=False)
  assert jax.device_count() == 4
  return root, state


@pytest.mark.parametrize('placement', ['resident', 'streaming'])
def test_two_processes_match_one_process_with_four_devices(single_process_run, tmp_path, placement):
  root, single = single_process_run
  multi = small_config(
      root / 'cache',
      num_epochs=2,
      learning_rate=ROUNDING_LR,
      distributed=True,
      coordinator_address=f'127.0.0.1:{_free_port()}',
      num_processes=2,
      **{'data.placement': placement},
  )
  script = tmp_path / 'process.py'
  script.write_text(
      _PROCESS.format(
          config=multi.to_dict(), workdir=str(tmp_path / 'multi'), out=str(tmp_path / 'params.npz')
      )
  )
  env = {
      **os.environ,
      'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': REPO,
  }
  procs = [
      subprocess.Popen(
          [sys.executable, str(script), str(i)],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 speaks (and writes metrics, below).
  assert 'training on 4 cpu device(s)' in outs[0][0] and 'training on' not in outs[1][0]
  # Each process holds (and, streaming, reads) only its half of every global batch of 8.
  assert 'process 0 of 2 devices 4 reads batch positions [0, 1, 2, 3]' in outs[0][0], outs[0][0]
  assert 'process 1 of 2 devices 4 reads batch positions [4, 5, 6, 7]' in outs[1][0], outs[1][0]
  got = np.load(tmp_path / 'params.npz')
  expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(single.variables()))]
  assert len(got.files) == len(expected)
  a = [json.loads(l) for l in (root / 'single' / 'metrics.jsonl').read_text().splitlines()]
  b = [
      json.loads(l) for l in (tmp_path / 'multi' / 'metrics.jsonl').read_text().splitlines()
  ]  # process 0 only
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    for key in ('train_loss', 'val_loss'):
      assert abs(x[key] - y[key]) <= 1e-5 * abs(x[key]), (key, x[key], y[key])
  # Parameters: gloo adds the gradients across processes in another order than XLA does within
  # one, hence ROUNDING_LR above (see test_train).
  assert_params_alike(
      [got[f'arr_{i}'] for i in range(len(expected))], expected, ROUNDING_LR, b[-1]['step']
  )
  # Checkpoints were written collectively by 2 processes; they restore onto this one process's
  # 4 devices (abstract targets with the new shardings), equal to what process 0 saved.
  from colorflax import checkpoints

  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  _, variables, step = checkpoints.restore_for_inference(tmp_path / 'multi', multi, 'latest', mesh)
  assert step == 8
  for i, leaf in enumerate(jax.tree_util.tree_leaves(jax.device_get(variables))):
    np.testing.assert_array_equal(np.asarray(leaf), got[f'arr_{i}'])
  if placement == 'streaming':  # each process saved its own stream state in every checkpoint
    data = tmp_path / 'multi' / 'checkpoints' / '8' / 'data'
    assert sorted(f for f in os.listdir(data) if f.startswith('process_')) == [
        'process_0-of-2.json',
        'process_1-of-2.json',
    ]


@pytest.mark.parametrize('stop', ['SIGHUP', 'output lost'])
def test_a_stop_asked_of_one_process_stops_both_at_the_same_step_with_a_checkpoint(
    single_process_run, tmp_path, stop
):
  # A preempted host: jax.distributed catches SIGTERM and has every process agree on the dispatch
  # after which they save their collective checkpoint and stop, though only one got the signal.
  # SIGHUP (one worker's ssh session dropped) and output that can no longer be written (the pipe
  # to a dropped ssh session) are handed to the same agreement: the process sends itself that
  # SIGTERM, so the SIGHUP case is a scheduler's SIGTERM too, one step further back.
  root, _ = single_process_run
  work, port = tmp_path / 'multi', _free_port()
  args = [
      '--config=configs/quickstart.py',
      f'--config.data.cache_dir={root / "cache"}',
      '--config.data.synthetic_images=48',
      '--config.data.image_size=32',
      '--config.features.calibration_images=16',
      '--config.model.width=0.125',
      '--config.batch_size=8',
      '--config.steps_per_dispatch=2',
      '--config.num_epochs=50',
      '--config.distributed=True',
      f'--config.coordinator_address=127.0.0.1:{port}',
      '--config.num_processes=2',
      f'--workdir={work}',
  ]
  env = {
      **os.environ,
      'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
      'JAX_PLATFORMS': 'cpu',
  }
  stderr = [subprocess.STDOUT if stop == 'output lost' else subprocess.PIPE, subprocess.PIPE]
  procs = [
      subprocess.Popen(
          [sys.executable, '-m', 'colorflax.train', *args, f'--config.process_id={i}'],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=stderr[i],
          text=True,
      )
      for i in range(2)
  ]
  for line in procs[
      0
  ].stdout:  # an epoch run by both (a collective checkpoint): both have their handlers
    if line.startswith('epoch 1:'):
      break
  if stop == 'output lost':
    procs[0].stdout.close()  # the one that speaks: its next line gets EPIPE
  else:
    procs[1].send_signal(getattr(signal, stop))  # the one that does not speak
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [err and err[-3000:] for _, err in outs]
  from colorflax import checkpoints

  step = checkpoints.manager(work, read_only=True).latest_step()
  if stop != 'output lost':
    last = outs[0][1].strip().splitlines()[-1]
    stopped = re.fullmatch(
        r'train\.py: stopped by SIGTERM at step (\d+) \(.+\) with a checkpoint; run the same '
        r'command again to resume',
        last,
    )
    assert stopped, outs[0][1][-3000:]
    assert int(stopped.group(1)) == step
  # The signal comes once epoch 1's line is out, which is before its checkpoint: the processes
  # stop after epoch 1 (step 4) or later, never before their handlers were in place.
  assert 4 <= step < 50 * 4
  config = small_config(root / 'cache')
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  assert checkpoints.restore_for_inference(work, config, 'latest', mesh)[2] == step
