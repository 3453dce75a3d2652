import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from colorflax import checkpoints, features_cache, reporting, signals
from colorflax import train, train_step
from colorflax.errors import UserError
from configs import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(cache_dir, **over):
  c = quickstart.get_config()
  c.data.cache_dir = str(cache_dir)
  c.data.synthetic_images = 48
  c.data.image_size = 32
  c.features.batch_size = 16
  c.features.num_workers = 1
  c.features.calibration_images = 16
  c.model.width = 0.125
  c.batch_size = 8
  c.steps_per_dispatch = 2
  c.num_epochs = 2
  c.samples_every_epochs = 1
  c.num_samples = 4
  for key, value in over.items():
    node = c
    *path, name = key.split('.')
    for p in path:
      node = node[p]
    node[name] = value
  return c


@pytest.fixture(scope='module')
def cache_dir(small_cache):
  return small_cache  # conftest's, built once for every module that only reads it


def _params(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.variables()))]


def _assert_same_params(a, b, tol=1e-6):
  for x, y in zip(_params(a), _params(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=tol)


# Runs that compute the same thing in float32 with a different rounding (1 vs 4 devices, a scan
# vs host-queued steps, two forms of a layer) train at this learning rate. Adam turns a gradient
# element at rounding level into a step of up to lr either way, and at the configs' 1e-3 those
# steps moved the two runs' losses up to 8e-5 apart or not at all depending on the seed and on
# unrelated changes of rounding; at 1e-6 the losses agree to ~1e-8. Nothing these tests check
# depends on the step size.
ROUNDING_LR = 1e-6


def slowed_down(fn, outstanding):
  """`fn`, each of its outputs held back by ~0.1 s more device work (a heavy no-op), recording at
  each call how many earlier outputs the device has not finished: how far the host runs ahead."""
  heavy = jax.jit(
      lambda out, m: jax.tree_util.tree_map(
          lambda x: x + (jnp.sum(jnp.tanh(m @ m @ m @ m)) > 1e30).astype(x.dtype), out
      )
  )
  m = jnp.eye(1024) * 0.5
  outputs = []

  def call(*args):
    outstanding.append(sum(not jax.tree_util.tree_leaves(o)[0].is_ready() for o in outputs))
    outputs.append(heavy(fn(*args), m))
    return outputs[-1]

  return call


def _assert_trained_alike(a, b, dirs, lr):
  """Losses equal to 1e-5 and parameters alike (assert_params_alike)."""
  la, lb = ([json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()] for d in dirs)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    for key in ('train_loss', 'val_loss'):
      assert abs(x[key] - y[key]) <= 1e-5 * abs(x[key]), (key, x[key], y[key])
  steps = int(a.step)
  assert int(b.step) == steps > 0
  assert_params_alike(_params(a), _params(b), lr, steps)


def assert_params_alike(a, b, lr, steps):
  """No parameter further apart than Adam's steps could take it (lr per step), and all but 0.1 %
  within a tenth of that: a gradient missing a device's share would move most of them."""
  diffs = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
  assert diffs.max() <= lr * steps, diffs.max()
  assert np.mean(diffs > 0.1 * lr * steps) <= 1e-3, np.mean(diffs > 0.1 * lr * steps)


def test_outputs_and_metrics(cache_dir, tmp_path):
  work = tmp_path / 'run'
  state, last = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3, keep_checkpoints=1, samples_every_epochs=2),
      str(work),
      progress=False,
  )
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [l['epoch'] for l in lines] == [1, 2, 3]
  # Kept: the latest and the best by validation loss, nothing else.
  mngr = checkpoints.manager(work, read_only=True)
  best = min(lines, key=lambda l: l['val_loss'])['step']
  assert mngr.best_step() == best
  assert set(mngr.all_steps()) == {best, lines[-1]['step']}
  for key in (
      'epoch',
      'step',
      'lr',
      'train_loss',
      'val_loss',
      'val_psnr',
      'val_psnr_gray',
      'images_per_sec',
      'elapsed_sec',
  ):
    assert key in lines[-1]
  assert lines[-1]['step'] == 3 * (36 // 8) == int(state.step)
  assert sorted(os.listdir(work / 'samples')) == [
      'epoch_0002.png',
      'epoch_0003.png',
  ]  # every 2, and the last
  from PIL import Image

  with Image.open(work / 'samples' / 'epoch_0002.png') as grid:
    assert grid.size == (4 * 32, 3 * 32)
  assert any(f.startswith('events') for f in os.listdir(work / 'tensorboard'))
  assert json.loads((work / 'config.json').read_text())['data']['image_size'] == 32
  variables, meta, step = checkpoints.restore_model(work, 'latest')
  assert step == lines[-1]['step'] and meta['epoch'] == 3


def test_bfloat16_training(cache_dir, tmp_path, capsys):
  state, last = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=1, **{'model.dtype': 'bfloat16'}),
      str(tmp_path / 'bf16'),
      progress=False,
  )
  assert (
      'bfloat16 is no faster than float32 on XLA:CPU' in capsys.readouterr().out
  )  # the tests run on CPU
  assert train.dtype_note(small_config(cache_dir), 'cpu') is None  # float32: nothing to say
  assert train.dtype_note(small_config(cache_dir, **{'model.dtype': 'bfloat16'}), 'gpu') is None
  assert np.isfinite(last['train_loss']) and np.isfinite(last['val_loss'])
  assert all(x.dtype == np.float32 for x in _params(state))  # parameters (and Adam) stay float32
  assert all(
      x.dtype == np.float32
      for x in jax.tree_util.tree_leaves(state.opt_state)
      if hasattr(x, 'dtype') and np.issubdtype(x.dtype, np.floating)
  )


def test_resume_after_an_epoch_equals_uninterrupted(cache_dir, tmp_path, capsys):
  full, _ = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3), str(tmp_path / 'a'), progress=False
  )
  train.train_and_evaluate(
      small_config(cache_dir, num_epochs=1), str(tmp_path / 'b'), progress=False
  )
  resumed, _ = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3), str(tmp_path / 'b'), progress=False
  )
  _assert_same_params(full, resumed)
  a = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  b = [json.loads(l) for l in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
  assert [x['val_loss'] for x in a] == pytest.approx([x['val_loss'] for x in b], rel=1e-6)
  # The same command again: it says there is nothing to do, and changes nothing in the workdir.
  before = {p: p.read_bytes() for p in (tmp_path / 'b').rglob('*') if p.is_file()}
  again, last = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3), str(tmp_path / 'b'), progress=False
  )
  assert (
      last is None
      and 'nothing to train: config.num_epochs=3 ends at step' in capsys.readouterr().out
  )
  _assert_same_params(resumed, again)
  assert {p: p.read_bytes() for p in (tmp_path / 'b').rglob('*') if p.is_file()} == before


@pytest.mark.parametrize('placement', ['resident', 'streaming'])
def test_resume_mid_epoch_equals_uninterrupted(cache_dir, tmp_path, monkeypatch, placement):
  # Dispatches of 2 steps end at 2, 4, 6, 8; a checkpoint is due whenever one crosses a multiple
  # of 5, so at 6 (4 and 8 end epochs, which always checkpoint).
  config = small_config(
      cache_dir, num_epochs=2, checkpoint_every_steps=5, **{'data.placement': placement}
  )
  full, _ = train.train_and_evaluate(config, str(tmp_path / 'a'), progress=False)

  real_save = checkpoints.save

  def crash_after_mid_epoch_save(mngr, step, **kw):
    real_save(mngr, step, **kw)
    if step == 6:  # epoch 2 runs steps 4..8: a crash right after its mid-epoch checkpoint
      mngr.wait_until_finished()
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoints, 'save', crash_after_mid_epoch_save)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'b'), progress=False)
  monkeypatch.setattr(checkpoints, 'save', real_save)
  assert checkpoints.manager(tmp_path / 'b', read_only=True).latest_step() == 6
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'b'), progress=False)
  _assert_same_params(full, resumed)
  # metrics.jsonl too: epoch 2's train_loss counts its steps before the crash (the checkpoint
  # kept their losses), as the uninterrupted run's does.
  lines = [
      [json.loads(l) for l in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]
      for d in 'ab'
  ]
  assert [l['train_loss'] for l in lines[0]] == [l['train_loss'] for l in lines[1]]


def test_a_signal_as_the_last_checkpoint_is_written_lets_it_complete(
    cache_dir, tmp_path, monkeypatch
):
  # SIGTERM lands while training waits for its last checkpoint (the third wait: before the
  # saves of steps 4 and 8, then at the end). It used to be raised inside that wait, which cut
  # the checkpoint off: the rerun trained the whole last epoch again.
  real_wait, calls = checkpoints.wait, []

  def wait(mngr):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    real_wait(mngr)

  monkeypatch.setattr(checkpoints, 'wait', wait)
  with signals.stop_on_signals():  # what every command runs in: SIGTERM raises, as Ctrl-C
    state, last = train.train_and_evaluate(
        small_config(cache_dir), str(tmp_path / 'run'), progress=False
    )
  assert len(calls) >= 3 and last['step'] == int(state.step) == 8
  assert checkpoints.manager(tmp_path / 'run', read_only=True).latest_step() == 8


def test_a_learning_rate_changed_on_resume_counts_from_the_first_resumed_step(cache_dir, tmp_path):
  base = small_config(cache_dir, num_epochs=1)
  train.train_and_evaluate(base, str(tmp_path / 'same'), progress=False)
  train.train_and_evaluate(
      small_config(cache_dir, num_epochs=2), str(tmp_path / 'same'), progress=False
  )
  train.train_and_evaluate(base, str(tmp_path / 'changed'), progress=False)
  faster = small_config(cache_dir, num_epochs=2, learning_rate=1e-2)
  state, last = train.train_and_evaluate(faster, str(tmp_path / 'changed'), progress=False)
  assert float(state.opt_state.hyperparams['learning_rate']) == pytest.approx(1e-2)
  assert last['lr'] == pytest.approx(1e-2)
  same, changed = (
      json.loads((tmp_path / d / 'metrics.jsonl').read_text().splitlines()[1])
      for d in ('same', 'changed')
  )
  assert changed['train_loss'] != same['train_loss']  # epoch 2 trained at the new rate


def test_a_metrics_line_cut_off_by_a_crash_is_dropped_on_resume(cache_dir, tmp_path):
  work = tmp_path / 'run'
  train.train_and_evaluate(small_config(cache_dir, num_epochs=1), str(work), progress=False)
  with open(work / 'metrics.jsonl', 'a') as f:
    f.write('{"epoch": 2, "step": 8, "train_lo')  # what a crash in the middle of a write leaves
  train.train_and_evaluate(small_config(cache_dir, num_epochs=2), str(work), progress=False)
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [l['epoch'] for l in lines] == [1, 2] and 'train_loss' in lines[1]


def test_a_workdir_inside_the_features_cache_is_refused(cache_dir, tmp_path):
  for inside in (cache_dir, cache_dir / 'run'):
    with pytest.raises(
        UserError, match='is inside the features cache .*: use a workdir outside it'
    ):
      train.train_and_evaluate(small_config(cache_dir), str(inside), progress=False)
  assert not (cache_dir / 'run').exists()


def test_suggested_commands_quote_paths_with_spaces():
  hint = train.precompute_command(['--config', 'my configs/x.py', '--config.data.cache_dir=/a b'])
  assert hint == (
      "python -m colorflax.precompute_features --config 'my configs/x.py' "
      "'--config.data.cache_dir=/a b'"
  )


# The small_config run on the command line (its cache built by the cache_dir fixture).
_SMALL_RUN_ARGS = [
    '--config=configs/quickstart.py',
    '--config.data.synthetic_images=48',
    '--config.data.image_size=32',
    '--config.features.calibration_images=16',
    '--config.model.width=0.125',
    '--config.batch_size=8',
    '--config.steps_per_dispatch=2',
]


def _signal_at_dispatch(monkeypatch, dispatch, *signals):
  """Sends `signals` to this process just before the training loop's `dispatch`-th call."""
  real = train_step.make_train_chunk

  def make(*args, **kw):
    chunk, calls = real(*args, **kw), []

    def counted(*a):
      calls.append(1)
      if len(calls) == dispatch:
        for sig in signals:
          os.kill(os.getpid(), sig)
      return chunk(*a)

    return counted

  monkeypatch.setattr(train_step, 'make_train_chunk', make)


# Dispatches of 2 steps end at 2, 4 | 6, 8 (epochs of 4 steps). A stop asked for mid-epoch saves at
# once; one asked for in an epoch's last dispatch lets the epoch validate and save first.
@pytest.mark.parametrize(
    'sig,dispatch,step,where',
    [(signal.SIGTERM, 3, 6, 'in epoch 2'), (signal.SIGINT, 2, 4, 'after epoch 1')],
)
def test_a_signal_stops_training_with_a_checkpoint_and_resuming_equals_uninterrupted(
    cache_dir, tmp_path, monkeypatch, capsys, sig, dispatch, step, where
):
  config = small_config(cache_dir, num_epochs=2)
  full, _ = train.train_and_evaluate(config, str(tmp_path / 'a'), progress=False)
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  _signal_at_dispatch(monkeypatch, dispatch, sig)
  with pytest.raises(
      signals.Interrupted,
      match=rf'stopped by {sig.name} at step {step} \({where}\) with a checkpoint',
  ) as stopped:
    train.train_and_evaluate(config, str(tmp_path / 'b'), progress=False)
  assert stopped.value.exit_code == 128 + sig
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back
  assert f'{sig.name} received: stopping after this dispatch' in capsys.readouterr().err
  assert checkpoints.manager(tmp_path / 'b', read_only=True).latest_step() == step
  assert len((tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()) == 1  # epoch 1 validated
  monkeypatch.undo()
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'b'), progress=False)
  _assert_same_params(full, resumed)


def test_a_second_ctrl_c_interrupts_at_once(cache_dir, tmp_path, monkeypatch):
  _signal_at_dispatch(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(
        small_config(cache_dir, num_epochs=2), str(tmp_path / 'run'), progress=False
    )
  assert checkpoints.manager(tmp_path / 'run', read_only=True).all_steps() == [
      4
  ]  # no step-6 save waited for
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_to_the_train_command_exits_143_with_one_line(cache_dir, tmp_path):
  work = tmp_path / 'run'
  proc = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'colorflax.train',
          *_SMALL_RUN_ARGS,
          f'--config.data.cache_dir={cache_dir}',
          '--config.num_epochs=50',
          f'--workdir={work}',
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  for line in proc.stdout:  # the handlers are in place once this line is out
    if line.startswith('training on'):
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 143, err[-3000:]
  last = err.strip().splitlines()[-1]
  stopped = re.fullmatch(
      r'train\.py: stopped by SIGTERM at step (\d+) \(.+\) with a checkpoint; run the same '
      r'command again to resume',
      last,
  )
  assert stopped, err[-3000:]
  assert checkpoints.manager(work, read_only=True).latest_step() == int(stopped.group(1)) < 50 * 4
  assert 'did not provide metrics' not in err  # orbax's warning on every mid-epoch checkpoint


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGHUP], ids=['SIGINT', 'SIGHUP'])
def test_a_signal_to_the_process_group_with_grain_workers_stops_cleanly(cache_dir, tmp_path, sig):
  # A terminal's Ctrl-C (and SLURM's signals, and the SIGHUP a shell sends its jobs when its
  # terminal closes) reach every process of the group, grain's stream workers too: they leave the
  # stop to training, which saves and then closes them.
  work = tmp_path / 'run'
  proc = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'colorflax.train',
          *_SMALL_RUN_ARGS,
          f'--config.data.cache_dir={cache_dir}',
          '--config.num_epochs=50',
          '--config.data.placement=streaming',
          '--config.data.stream_workers=2',
          f'--workdir={work}',
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
  )
  for line in proc.stdout:
    if line.startswith('training on'):
      break
  time.sleep(3)  # the workers are up and filling their buffers
  os.killpg(proc.pid, sig)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 128 + sig, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  assert 'leaked shared_memory' not in err, err[-3000:]  # the workers lived to free their batches
  stopped = re.search(rf'stopped by {sig.name} at step (\d+) ', err)
  assert stopped and checkpoints.manager(work, read_only=True).latest_step() == int(
      stopped.group(1)
  )


def test_validation_keeps_the_host_at_most_two_batches_ahead_of_the_device(
    cache_dir, tmp_path, monkeypatch
):
  # JAX dispatches asynchronously: a validation loop that never waits would queue every batch of
  # the split (a streamed one, larger than device memory, too) while the device catches up.
  outstanding, make_evaluate = [], train_step.make_evaluate
  monkeypatch.setattr(
      train_step, 'make_evaluate', lambda *a: slowed_down(make_evaluate(*a), outstanding)
  )
  train.train_and_evaluate(
      small_config(cache_dir, num_epochs=1, eval_batch_size=4, **{'data.val_fraction': 0.75}),
      str(tmp_path / 'run'),
      progress=False,
  )
  assert (
      len(outstanding) == 9 and max(outstanding) <= 2
  ), outstanding  # 36 validation images, batches of 4


def test_a_streamed_run_with_workers_ends_without_leaking_shared_memory(cache_dir, tmp_path):
  # grain's prefetch thread keeps its last batches alive in a reference cycle; unless training
  # collects them, Python's resource tracker finds their shared memory at exit and warns of a leak.
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'colorflax.train',
          *_SMALL_RUN_ARGS,
          f'--config.data.cache_dir={cache_dir}',
          '--config.num_epochs=2',
          '--config.data.placement=streaming',
          '--config.data.stream_workers=2',
          f'--workdir={tmp_path / "run"}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'done: epoch 2' in r.stdout
  assert 'leaked shared_memory' not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize('output', ['terminal', 'pipe'])
def test_lost_output_stops_training_with_a_checkpoint(cache_dir, tmp_path, output):
  # Training over ssh without tmux, and the connection drops: its terminal hangs up (SIGHUP, then
  # EIO on every write), or the pipe that carried its output breaks (EPIPE; `ssh host cmd`,
  # `| tee`). It used to die of the SIGHUP, or of the next progress line's BrokenPipeError,
  # without a checkpoint (or in the middle of writing one).
  work = tmp_path / 'run'
  cmd = [
      sys.executable,
      '-m',
      'colorflax.train',
      *_SMALL_RUN_ARGS,
      f'--config.data.cache_dir={cache_dir}',
      '--config.num_epochs=50',
      f'--workdir={work}',
  ]
  if output == 'terminal':
    reader, child = os.openpty()
    # As a login shell's job: a session of its own whose controlling terminal is the pty (taken
    # before exec; no preexec_fn, which forks this multithreaded process).
    take_terminal = (
        'import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); '
        'os.execv(sys.argv[1], sys.argv[1:])'
    )
    proc = subprocess.Popen(
        [sys.executable, '-c', take_terminal, *cmd],
        cwd=REPO,
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,
    )
    os.close(child)
  else:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = proc.stdout.fileno()
  seen = b''
  while b'training on' not in seen:  # the handlers are in place once this line is out
    chunk = os.read(reader, 4096)
    assert chunk, seen.decode()[-3000:]
    seen += chunk
  if output == 'terminal':
    os.close(reader)  # the terminal hangs up: SIGHUP to the process that controls it
  else:
    proc.stdout.close()  # the next write gets EPIPE
  assert (
      proc.wait(timeout=600)
      == {'terminal': 128 + signal.SIGHUP, 'pipe': 128 + signal.SIGPIPE}[output]
  )
  step = checkpoints.manager(work, read_only=True).latest_step()
  assert step and sorted(os.listdir(work / 'checkpoints')) == sorted(
      str(s) for s in checkpoints.manager(work, read_only=True).all_steps()
  )
  mesh = jax.make_mesh(
      (1,), ('data',), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
  )
  assert checkpoints.restore_for_inference(work, small_config(cache_dir), 'latest', mesh)[2] == step


def test_a_checkpoint_that_cannot_be_written_is_one_line(cache_dir, tmp_path):
  # Files capped at 200 kB (the checkpoint's data file is larger): tensorstore's write fails
  # with EFBIG in orbax's background thread, as on a full disk. One line, not orbax's screenful.
  code = (
      'import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
      'resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); sys.argv[0] = "train.py"; '
      'runpy.run_module("colorflax.train", run_name="__main__")'
  )
  r = subprocess.run(
      [
          sys.executable,
          '-c',
          code,
          *_SMALL_RUN_ARGS,
          f'--config.data.cache_dir={cache_dir}',
          '--config.num_epochs=2',
          f'--workdir={tmp_path / "run"}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f'train.py: error: cannot write a checkpoint in {tmp_path}/run/checkpoints: '
      'File too large; none was completed: make room and run the same command again'
  )
  assert 'Event loop is closed' not in r.stderr


def test_four_devices_match_one(cache_dir, tmp_path):
  assert jax.device_count() == 4
  runs = [
      train.train_and_evaluate(
          small_config(cache_dir, num_devices=n, learning_rate=ROUNDING_LR),
          str(tmp_path / str(n)),
          progress=False,
      )[0]
      for n in (1, 4)
  ]
  _assert_trained_alike(*runs, (tmp_path / '1', tmp_path / '4'), ROUNDING_LR)


def test_streaming_and_resident_train_identically(cache_dir, tmp_path):
  a, _ = train.train_and_evaluate(
      small_config(cache_dir, **{'data.placement': 'resident'}), str(tmp_path / 'r'), progress=False
  )
  # grain worker processes read the cache; the training process only assembles and trains.
  b, _ = train.train_and_evaluate(
      small_config(cache_dir, **{'data.placement': 'streaming', 'data.stream_workers': 2}),
      str(tmp_path / 's'),
      progress=False,
  )
  _assert_same_params(a, b)
  # The stream's state went into every checkpoint (grain's handler: one file per process).
  for step in checkpoints.manager(tmp_path / 's', read_only=True).all_steps():
    state = json.loads(
        (tmp_path / 's' / 'checkpoints' / str(step) / 'data' / 'process_0-of-1.json').read_text()
    )
    assert state['first_step'] == 0 and state['iterator'], state
  assert not (tmp_path / 'r' / 'checkpoints' / '8' / 'data').exists()


def test_streaming_resumes_from_any_checkpoint_and_rejects_a_foreign_stream_state(
    cache_dir, tmp_path
):
  full, _ = train.train_and_evaluate(
      small_config(cache_dir), str(tmp_path / 'full'), progress=False
  )
  # A resident run's checkpoint has no stream state: the stream starts at the checkpoint's step.
  work = tmp_path / 'switch'
  train.train_and_evaluate(small_config(cache_dir, num_epochs=1), str(work), progress=False)
  streamed = small_config(cache_dir, **{'data.placement': 'streaming'})
  resumed, _ = train.train_and_evaluate(streamed, str(work), progress=False)
  _assert_same_params(full, resumed)
  # A stream state that does not lead to the checkpoint's step is refused, not trained on.
  work = tmp_path / 'tampered'
  train.train_and_evaluate(
      small_config(cache_dir, num_epochs=1, **{'data.placement': 'streaming'}),
      str(work),
      progress=False,
  )
  path = work / 'checkpoints' / '4' / 'data' / 'process_0-of-1.json'
  state = json.loads(path.read_text())
  state['first_step'] += 1
  path.write_text(json.dumps(state))
  with pytest.raises(
      UserError, match='stream delivered steps 5..6 where the training state expects 4..5'
  ):
    train.train_and_evaluate(streamed, str(work), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path, capsys, monkeypatch):
  bad_cache = tmp_path / 'bad'
  shutil.copytree(cache_dir, bad_cache)
  work = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(bad_cache, num_epochs=1), work, progress=False)
  good = checkpoints.manager(work, read_only=True).latest_step()
  emb = np.load(bad_cache / 'embeddings.npy', mmap_mode='r+')
  emb[:] = np.nan
  emb.flush()
  del emb
  capsys.readouterr()
  monkeypatch.setattr(reporting, '_interactive', lambda: True)  # tqdm's bar, as on a terminal
  with pytest.raises(train.TrainingDiverged) as info:
    train.train_and_evaluate(small_config(bad_cache, num_epochs=2), work, progress=True)
  assert re.fullmatch(
      rf'loss became nan at step \d+; stopping\. The last good checkpoint \(step {good}\) is kept',
      str(info.value),
  )
  assert capsys.readouterr().err.endswith(
      '\n'
  )  # the progress bar ended its line: the error starts a new one
  assert checkpoints.manager(work, read_only=True).latest_step() == good
  with pytest.raises(
      train.TrainingDiverged, match=r'at step \d+; stopping\. No checkpoint had been written$'
  ):
    train.train_and_evaluate(
        small_config(bad_cache, num_epochs=1), str(tmp_path / 'fresh'), progress=False
    )


def test_cut_off_checkpoint_is_ignored(cache_dir, tmp_path):
  work = tmp_path / 'run'
  train.train_and_evaluate(small_config(cache_dir, num_epochs=1), str(work), progress=False)
  ckpt = work / 'checkpoints'
  good = checkpoints.manager(work, read_only=True).latest_step()
  partial = ckpt / f'{good + 100}.orbax-checkpoint-tmp-1234567'  # what a write killed midway leaves
  shutil.copytree(ckpt / str(good), partial)
  shutil.rmtree(partial / 'train')
  assert checkpoints.manager(work, read_only=True).latest_step() == good
  _, meta, step = checkpoints.restore_model(work, 'latest')
  assert step == good
  state, _ = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=2), str(work), progress=False
  )
  assert int(state.step) == 2 * 4


def test_damaged_latest_checkpoint_stops_resume_until_moved_aside(cache_dir, tmp_path):
  work = tmp_path / 'run'
  train.train_and_evaluate(small_config(cache_dir, num_epochs=2), str(work), progress=False)
  damaged = work / 'checkpoints' / '8'
  shutil.rmtree(damaged / 'train')  # complete when written, a part lost since
  with pytest.raises(
      UserError,
      match=r'checkpoint step 8 in .* cannot be read .*; move .*checkpoints/8 aside '
      r'to resume from the one before it \(the others: \[4\]\)',
  ):
    train.train_and_evaluate(small_config(cache_dir, num_epochs=3), str(work), progress=False)
  assert (damaged / 'model').is_dir()  # nothing deleted
  shutil.move(damaged, tmp_path / 'aside')
  state, last = train.train_and_evaluate(
      small_config(cache_dir, num_epochs=3), str(work), progress=False
  )
  assert int(state.step) == 3 * 4 and last['epoch'] == 3


def test_incompatible_resume_and_bad_cache_are_clear_errors(cache_dir, tmp_path):
  work = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(cache_dir, num_epochs=1), work, progress=False)
  with pytest.raises(UserError, match='model.width'):
    train.train_and_evaluate(small_config(cache_dir, **{'model.width': 0.25}), work, progress=False)
  with pytest.raises(UserError, match='precompute_features'):
    train.train_and_evaluate(
        small_config(tmp_path / 'nowhere'), str(tmp_path / 'x'), progress=False
    )
  with pytest.raises(UserError, match='holds 32px images'):
    train.train_and_evaluate(
        small_config(cache_dir, **{'data.image_size': 64}), str(tmp_path / 'y'), progress=False
    )
  with pytest.raises(UserError, match='pool'):
    train.train_and_evaluate(
        small_config(cache_dir, **{'features.kind': 'pool'}), str(tmp_path / 'z'), progress=False
    )


def test_a_cache_of_other_data_than_the_config_names_is_refused(cache_dir, tmp_path):
  # Not silently trained on: the default data.cache_dir is shared by every data.source.
  photos = tmp_path / 'photos'
  photos.mkdir()
  fits = '--config.data.source=synthetic --config.data.synthetic_images=48'
  cases = [
      (
          {'data.source': str(photos)},
          rf'built from synthetic \(48 landscapes, seed 42\), but data.source names {photos}: '
          rf'to train on this cache, add {fits}; to train on {photos}, build its own cache',
      ),
      (
          {'data.synthetic_images': 47},
          rf'but data.source names synthetic \(47 landscapes, seed 42\): .* add {fits};',
      ),
      (
          {'data.resize': 'center_crop'},
          'built with data.resize=squash, but this config has center_crop: train on it '
          'with --config.data.resize=squash, or rebuild it',
      ),
  ]
  for over, message in cases:
    with pytest.raises(UserError, match=message):
      train.train_and_evaluate(
          small_config(cache_dir, **over), str(tmp_path / 'run'), progress=False
      )
    assert not (tmp_path / 'run').exists()
  # Training's own seed may differ from the one the synthetic images were made with, and its
  # Inception weights setting is not read (colorize takes the cache's record).
  cache = features_cache.open_cache(cache_dir)
  features_cache.check_built_for(cache, small_config(cache_dir, seed=7))
  features_cache.check_built_for(
      cache, small_config(cache_dir, **{'features.inception_weights': 'imagenet'})
  )
  features_cache.check_built_for(cache, small_config(cache_dir))


def _fresh_state(config):
  from colorflax import distributed
  from colorflax import model as model_lib

  tx, plateau = train_step.make_optimizer(config)
  return train_step.create_state(
      config,
      model_lib.model_from_config(config),
      tx,
      plateau,
      distributed.replicated(distributed.data_mesh()),
  )


def _init_from(config, fresh):
  """(state, step) as a new run starts from config.init_from (train.restore_or_init)."""
  import tempfile

  mngr = checkpoints.manager(tempfile.mkdtemp())  # a new run's: no checkpoint of its own yet
  starts = []
  real = checkpoints.restore_init_from
  checkpoints.restore_init_from = lambda *a: starts.append(real(*a)) or starts[-1]
  try:
    state, _, _ = train.restore_or_init(config, fresh, mngr, False, lambda *a: None)
  finally:
    checkpoints.restore_init_from = real
    mngr.close()
  return state, starts[0][1]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_init_from_starts_a_new_run_from_another_runs_weights(cache_dir, tmp_path, monkeypatch):
  source = tmp_path / 'source'
  train.train_and_evaluate(small_config(cache_dir, num_epochs=2), str(source), progress=False)
  best, _, best_step = checkpoints.restore_model(source, 'best')
  config = small_config(cache_dir, num_epochs=1, init_from=str(source))
  fresh = _fresh_state(config)
  state, step = _init_from(config, fresh)
  assert step == best_step
  for got, want, random in zip(
      _leaves(state.variables()), _leaves(best), _leaves(fresh.variables())
  ):
    np.testing.assert_array_equal(got, want)
    assert got.shape == random.shape
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(state.params), _leaves(fresh.params)))
  for got, want in zip(
      _leaves((state.step, state.opt_state, state.plateau)),
      _leaves((fresh.step, fresh.opt_state, fresh.plateau)),
  ):
    np.testing.assert_array_equal(got, want)  # a fresh optimizer at step 0
  per_epoch = json.loads((source / 'metrics.jsonl').read_text().splitlines()[0])['step']
  for which, expected in (('latest', 2 * per_epoch), (str(per_epoch), per_epoch)):
    assert (
        _init_from(small_config(cache_dir, init_from=str(source), init_checkpoint=which), fresh)[1]
        == expected
    )

  # The whole run: it starts at step 0 from those weights; once it has checkpoints, resuming wins.
  starts = []
  restore_init_from = checkpoints.restore_init_from
  monkeypatch.setattr(
      checkpoints,
      'restore_init_from',
      lambda *a: starts.append(restore_init_from(*a)) or starts[-1],
  )
  work = tmp_path / 'finetune'
  train.train_and_evaluate(config, str(work), progress=False)
  assert [step for _, step in starts] == [best_step]
  first = json.loads((work / 'metrics.jsonl').read_text().splitlines()[0])
  assert first['epoch'] == 1 and first['step'] == per_epoch
  gone = small_config(cache_dir, num_epochs=2, init_from=str(tmp_path / 'moved_away'))
  state, last = train.train_and_evaluate(gone, str(work), progress=False)
  assert last['epoch'] == 2 and int(state.step) == 2 * per_epoch and len(starts) == 1

  with pytest.raises(
      UserError, match=r'has model.width=0.125, this config 0.25; set model.width=0.125'
  ):
    train.train_and_evaluate(
        small_config(cache_dir, init_from=str(source), **{'model.width': 0.25}),
        str(tmp_path / 'w'),
        progress=False,
    )
  with pytest.raises(UserError, match='has no config.json'):
    train.train_and_evaluate(
        small_config(cache_dir, init_from=str(tmp_path / 'nowhere')),
        str(tmp_path / 'n'),
        progress=False,
    )


def test_init_from_an_imported_prototype_checkpoint(cache_dir, tmp_path):
  from colorflax import convert, convert_torch
  from colorflax.reference import EncDec

  torch.manual_seed(0)
  torch.save(EncDec().state_dict(), tmp_path / 'seed.pth')
  imported = tmp_path / 'imported'
  convert_torch.convert(tmp_path / 'seed.pth', str(imported))
  config = small_config(cache_dir, num_epochs=1, **{'model.width': 1.0})
  # Its workdir has weights but no training state: training there says how to start from it.
  with pytest.raises(UserError, match=f'holds imported weights.*--config.init_from={imported}'):
    train.train_and_evaluate(config, str(imported), progress=False)
  config.init_from = str(tmp_path / 'seed.pth')  # the prototype's file itself: say how to import it
  with pytest.raises(
      UserError,
      match=re.escape(
          f'is a file; a colorflax workdir (of train or convert_torch) is a '
          f'folder; import a PyTorch checkpoint first with `python -m '
          f'colorflax.convert_torch {tmp_path}/seed.pth --workdir DIR`'
      ),
  ):
    _init_from(config, _fresh_state(config))
  config.init_from = str(imported)
  state, step = _init_from(config, _fresh_state(config))
  _, expected = convert.load_torch_checkpoint(tmp_path / 'seed.pth')
  assert step == 0
  for got, want in zip(_leaves(state.variables()), _leaves(expected)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('cooldown', [0, 2])
def test_plateau_matches_torch_reduce_lr_on_plateau(cooldown):
  c = quickstart.get_config()
  c.plateau.patience, c.plateau.cooldown, c.plateau.factor = 2, cooldown, 0.5
  tx, plateau = train_step.make_optimizer(c)
  step = jax.jit(lambda s, v: plateau.update(updates={}, state=s, value=v)[1])
  state = plateau.init({})
  opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=c.learning_rate)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
      opt, mode='min', factor=0.5, patience=2, cooldown=cooldown, threshold=c.plateau.threshold
  )
  rng = np.random.default_rng(0)
  losses = (
      list(np.linspace(1, 0.5, 5))
      + [0.5] * 8
      + list(0.5 + rng.random(10) * 0.1)
      + [0.3, 0.3, 0.3, 0.29999]
  )
  for v in losses:
    state = step(state, np.float32(v))
    sched.step(float(np.float32(v)))
    assert c.learning_rate * float(state.scale) == pytest.approx(
        opt.param_groups[0]['lr'], rel=1e-6
    )


def test_training_process_never_imports_torch(cache_dir, tmp_path):
  config = small_config(cache_dir, num_epochs=1)
  code = f"""
import sys, ml_collections
from colorflax import train
config = ml_collections.ConfigDict({config.to_dict()!r})
train.train_and_evaluate(config, {str(tmp_path / 'w')!r}, progress=False)
assert 'torch' not in sys.modules, 'torch was imported'
print('ok')
"""
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-2000:]
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'w' / 'tensorboard'))


def test_device_and_host_step_loops_train_identically(cache_dir, tmp_path):
  # 'device' (one lax.scan per dispatch, what GPUs and TPUs run) and 'host' (CPU's default):
  # two different XLA programs, which round float32 differently.
  runs = [
      train.train_and_evaluate(
          small_config(cache_dir, num_epochs=1, step_loop=loop, learning_rate=ROUNDING_LR),
          str(tmp_path / loop),
          progress=False,
      )[0]
      for loop in ('device', 'host')
  ]
  assert int(runs[0].step) == 4
  _assert_trained_alike(*runs, (tmp_path / 'device', tmp_path / 'host'), ROUNDING_LR)


def test_polyphase_dec3_trains_like_the_plain_layer(cache_dir, tmp_path):
  # model.polyphase_dec3 (CPU's 'auto' on one device) against upsample -> concat -> conv.
  runs = [
      train.train_and_evaluate(
          small_config(
              cache_dir,
              num_epochs=1,
              num_devices=1,
              learning_rate=ROUNDING_LR,
              **{'model.polyphase_dec3': form},
          ),
          str(tmp_path / form),
          progress=False,
      )[0]
      for form in ('false', 'true')
  ]
  assert int(runs[0].step) == 4
  _assert_trained_alike(*runs, (tmp_path / 'false', tmp_path / 'true'), ROUNDING_LR)


def test_progress_in_a_log_file_is_plain_lines(monkeypatch, capsys):
  monkeypatch.setattr(reporting, 'LOG_EVERY_SECONDS', 0)  # a line for every update (60 s in use)
  for _ in reporting.progress_bar(
      range(3), desc='colorize', unit='img'
  ):  # stderr is captured: not a terminal
    pass
  bar = reporting._Progress(total=8, initial=4, enabled=True)
  bar.update(2, loss=0.25, images=16)
  bar.close()
  err = capsys.readouterr().err
  assert '\r' not in err and '|' not in err  # no carriage returns, no bar glyphs
  lines = err.splitlines()
  assert [
      line.split(' (')[0] for line in lines
  ] == [  # each update, then the final state when the bar closes
      'colorize: 0/3 img',
      'colorize: 1/3 img',
      'colorize: 2/3 img',
      'colorize: 3/3 img',
      'colorize: 3/3 img',
      'train: 4/8 step',
      'train: 6/8 step',
      'train: 6/8 step',
  ]
  assert lines[-1].endswith('loss=0.25000')
  monkeypatch.setattr(reporting, '_interactive', lambda: True)  # a terminal: tqdm's own bar
  for _ in reporting.progress_bar(range(3), desc='colorize'):
    pass
  assert '|' in capsys.readouterr().err
