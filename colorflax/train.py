"""`python -m colorflax.train --config CFG --workdir DIR`: the seed recipe on the accelerator.

Data-parallel over every device: one `jax.jit` program over a 1-D mesh, the batch sharded and
the state replicated (colorflax.distributed). One host dispatch runs `steps_per_dispatch`
optimizer steps (colorflax.train_step); their losses stay on the device and are read one
dispatch late, so the host never stalls the device. Every epoch: validation on the device, the
plateau scheduler, metrics, a checkpoint. A run that stops (a signal, a crash) resumes exactly
where it was: randomness is a function of (seed, step) and data order of (seed, epoch).
"""

import dataclasses
import os
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags

from colorflax import checkpoints, cli, device_pipeline, distributed, features_cache, files, losses
from colorflax import preemption
from colorflax import model as model_lib
from colorflax import reporting, signals, train_step
from colorflax.errors import UserError

PRECOMPUTE_HINT = 'python -m colorflax.precompute_features --config CONFIG'


class TrainingDiverged(UserError):
  pass


@dataclasses.dataclass
class RunPlan:
  """What a run's devices, batches and splits come to, from its config and its cache."""

  devices: list
  mesh: Any
  batch: int
  eval_batch: int
  train_rows: np.ndarray
  val_rows: np.ndarray
  steps_per_epoch: int
  total_steps: int
  placement: str  # 'resident' or 'streaming'


def plan_run(config, cache) -> RunPlan:
  devices = distributed.run_devices(config)
  batch = distributed.global_batch_size(config, len(devices))
  eval_batch = config.eval_batch_size or batch
  if eval_batch % len(devices):
    raise UserError(
        f'config.eval_batch_size: {eval_batch} does not split evenly over {len(devices)} devices'
    )
  train_rows, val_rows = device_pipeline.split_indices(
      cache.num_images, config.data.val_fraction, config.seed
  )
  steps_per_epoch = len(train_rows) // batch
  if steps_per_epoch == 0:
    raise UserError(
        f'config.batch_size: {batch} is larger than the {len(train_rows)} training images'
    )
  placement = device_pipeline.decide_resident(
      config.data.placement,
      cache.images.nbytes + cache.embeddings.nbytes,
      config.data.device_budget_fraction,
  )
  mesh = distributed.data_mesh(devices)
  total = steps_per_epoch * config.num_epochs
  return RunPlan(
      devices, mesh, batch, eval_batch, train_rows, val_rows, steps_per_epoch, total, placement
  )


def check_workdir_outside_cache(config, workdir):
  """A workdir inside the features cache would be deleted with it (precompute's --overwrite)."""
  cache = os.path.abspath(os.path.expanduser(config.data.cache_dir)).rstrip('/')
  for folder in (cache, features_cache.incomplete_dir(cache), features_cache.parts_root(cache)):
    if workdir == folder or workdir.startswith(folder + os.sep):
      raise UserError(
          f'--workdir {workdir} is inside the features cache {folder} (data.cache_dir), which '
          'precompute_features --overwrite replaces whole: use a workdir outside it'
      )


def open_training_cache(config, workdir, hint):
  """The features cache `config` trains on, refused with one line if it does not hold what the
  config names, or if `workdir` cannot take this run."""
  check_workdir_outside_cache(config, workdir)
  cache = features_cache.open_cache(config.data.cache_dir, hint)
  features_cache.check_matches_config(cache, config, hint)
  features_cache.check_built_for(cache, config, hint)
  checkpoints.check_can_train_in(workdir, config)
  return cache


def dtype_note(config, platform):
  """A line for runs whose dtype buys nothing on their backend, else None."""
  if config.model.dtype == 'bfloat16' and platform == 'cpu':
    return (
        'note: model.dtype=bfloat16 is no faster than float32 on XLA:CPU, whose convolutions '
        'do not use bf16/AMX units (BENCHMARKS.md); float32 trains as fast, at full precision'
    )
  return None


def restore_or_init(config, state, mngr, streaming, log):
  """(state, stream state or None, the checkpoint's meta or None): this run's latest checkpoint,
  with the learning rate config.learning_rate x the plateau's scale (a rate changed on resume
  counts from its first step); else, for a new run, config.init_from's weights with a fresh
  optimizer at step 0; else `state` as initialised."""
  if mngr.latest_step() is not None:
    wanted = None
    if streaming:
      from colorflax import streaming as streaming_lib  # grain: imported only by runs that stream

      wanted = streaming_lib.IteratorState()
    state, meta, stream_state = checkpoints.restore_train(mngr, state, data=wanted)
    workdir = os.path.dirname(str(mngr.directory))
    log(f'resumed from step {int(state.step)} (epoch {meta["epoch"]}) in {workdir}')
    before = float(state.opt_state.hyperparams['learning_rate'])
    set_rate = lambda state: train_step.set_learning_rate(state, config.learning_rate)
    state = jax.jit(set_rate, donate_argnums=0)(state)
    after = float(state.opt_state.hyperparams['learning_rate'])
    if after != before:
      log(f'learning rate {before:.3g} -> {after:.3g} (config.learning_rate x the plateau scale)')
    return state, stream_state, meta
  if config.get('init_from'):
    variables, step = checkpoints.restore_init_from(config, state.variables())
    log(f'starting from the weights of {config.init_from} (checkpoint step {step})')
    state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  return state, None, None


def training_objective(config, cache, plan, log):
  """The run's losses.Objective; for 'classification', with the rebalancing weights of its
  training split's colours, whose histogram is counted once and kept with the cache."""
  if config.get('loss', 'mse') != 'classification':
    return losses.objective(config)
  rows = np.asarray(plan.train_rows)
  key = features_cache.fingerprint({'rows': rows.tolist(), 'centres': len(losses.bin_centres())})
  path = os.path.join(cache.directory, f'{features_cache.HISTOGRAM_PREFIX}{key}.npy')
  if os.path.isfile(path):
    histogram = np.load(path)
  else:
    histogram = np.zeros(len(losses.bin_centres()), np.int64)
    for start in range(0, len(rows), 64):
      histogram += np.asarray(
          losses.ab_histogram(np.asarray(cache.images[rows[start : start + 64]]))
      )
    if jax.process_index() == 0:
      with files.atomic(path, 'wb') as f:
        np.save(f, histogram)
    log(f'colours of the {len(rows)} training images counted into {path}')
  c = config.classification
  weights = losses.class_weights(histogram, losses.bin_centres(), c.prior_sigma, c.rebalance)
  return losses.objective(config, weights)


def make_feeder(config, cache, plan, start_step, stream_state):
  """The run's batches: resident on the devices, or streamed by grain (device_pipeline)."""
  args = (
      plan.train_rows,
      plan.val_rows,
      plan.mesh,
      config,
      plan.batch,
      plan.steps_per_epoch,
      plan.eval_batch,
  )
  if plan.placement == 'resident':
    return device_pipeline.ResidentFeeder(cache, *args)
  from colorflax import streaming

  return streaming.StreamFeeder(
      os.path.abspath(cache.directory), *args, plan.total_steps, start_step, stream_state
  )


class Epochs:
  """The epochs of one run: each a loop of dispatches, then validation, the plateau, metrics, a
  checkpoint and samples. Stops with a checkpoint when `stop` is requested (a signal)."""

  def __init__(self, config, plan, model, tx, plateau, mngr, feeder, report, cache, objective):
    self.config, self.plan, self.mngr, self.feeder, self.report = config, plan, mngr, feeder, report
    self.cache = cache
    self.train_chunk = train_step.make_train_chunk(model, tx, config, objective)
    self.evaluate = train_step.make_evaluate(model, objective, config)
    self.predict = model_lib.make_predict(model, objective)
    self.step_plateau = train_step.plateau_step(plateau, config.learning_rate)
    masks = train_step.eval_masks(len(plan.val_rows), plan.eval_batch)
    self.eval_masks = [
        device_pipeline.global_array(m, distributed.batch_sharding(plan.mesh)) for m in masks
    ]
    self.bar = None
    self.start = time.time()
    # Last, so that nothing fails once it listens: from here SIGTERM, Ctrl-C and SIGHUP stop
    # training with a checkpoint, until close().
    self.stop = preemption.StopRequest(mngr)

  def save(self, state, step, meta, metrics=None):
    checkpoints.save(
        self.mngr,
        step,
        model=state.variables(),
        train=checkpoints.train_item(state),
        data=self.feeder.checkpoint_state(),
        meta=meta,
        metrics=metrics,
    )

  def stopped(self, step, epoch):
    """The Interrupted to raise once a stop was requested and step `step` saved."""
    where = f'in epoch {epoch + 1}' if step % self.plan.steps_per_epoch else f'after epoch {epoch}'
    stop = signals.Interrupted(
        f'at step {step} ({where}) with a checkpoint; run the same command again to resume',
        signal_name=self.stop.signal_name,
    )
    stop.step = step
    return stop

  def train(self, state, epoch, first, losses):
    """Steps `first`.. of `epoch` (first > 0 only when resuming mid-epoch): (state, losses), the
    epoch's running loss sum and its number of steps, continuing `losses` (those of the steps
    before `first`, which a mid-epoch checkpoint keeps, so that a resumed epoch's train_loss is
    the uninterrupted one's)."""
    spe, every = self.plan.steps_per_epoch, self.config.checkpoint_every_steps
    sizes = device_pipeline.dispatch_sizes(first, spe, self.config.steps_per_dispatch)
    pending, step = None, epoch * spe + first
    for n, (tables, xs) in zip(sizes, self.feeder.train_dispatches(step, sizes)):
      state, chunk_losses = self.train_chunk(state, tables, xs)
      if pending is not None:  # read the previous dispatch while this one runs
        self._check_finite(pending, losses)
      pending = (step, chunk_losses)
      step += n  # counted on the host: reading state.step would wait for the device
      mid_epoch = step % spe  # at an epoch's end, its validation comes first
      stopping = self.stop.requested() and mid_epoch
      if stopping or (every and step // every > (step - n) // every and mid_epoch):
        self._check_finite(pending, losses)
        pending = None
        meta = {'epoch': epoch, 'epoch_complete': False, 'epoch_losses': losses}
        self.save(state, step, meta)
      if stopping:
        raise self.stopped(step, epoch)
    if pending is not None:
      self._check_finite(pending, losses)
    return state, losses

  def _check_finite(self, pending, losses):
    """Reads a dispatch's losses into `losses` ([sum, steps]); a NaN or infinity stops the run."""
    first_step, chunk_losses = pending
    values = np.asarray(jax.device_get(chunk_losses))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise TrainingDiverged(
          f'loss became {values[bad[0]]} at step {first_step + int(bad[0]) + 1}; stopping'
      )
    for value in values.tolist():  # in step order, so that a resumed sum is the same float
      losses[0] += value
    losses[1] += len(values)
    self.bar.update(len(values), loss=float(values[-1]), images=len(values) * self.plan.batch)

  def validate(self, state):
    """The validation split's mean per-image metrics (train_step.make_evaluate)."""
    totals, in_flight = {}, device_pipeline.InFlight()  # a streamed split is not all read ahead
    for i, (mask, (tables, x)) in enumerate(zip(self.eval_masks, self.feeder.eval_batches())):
      sums = self.evaluate(state.variables(), tables, x, mask, i)
      totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
      in_flight.add(sums)
    n = len(self.plan.val_rows)
    return {k: float(v) / n for k, v in jax.device_get(totals).items()}

  def finish(self, state, epoch, losses, epoch_steps, train_seconds):
    """After an epoch's steps: validation, the plateau, metrics, checkpoint, samples."""
    step = (epoch + 1) * self.plan.steps_per_epoch
    val = self.validate(state)
    if not np.isfinite(val['loss']):
      raise TrainingDiverged(
          f'validation loss is {val["loss"]} after epoch {epoch + 1} (step {step}); stopping'
      )
    state = self.step_plateau(state, jnp.asarray(val['loss'], jnp.float32))
    last = {
        'epoch': epoch + 1,
        'step': step,
        'lr': float(state.opt_state.hyperparams['learning_rate']),
        'train_loss': losses[0] / losses[1] if losses[1] else float('nan'),
        'val_loss': val['loss'],
        'val_psnr': val['psnr'],
        'val_psnr_gray': val['psnr_gray'],
        'images_per_sec': epoch_steps * self.plan.batch / max(train_seconds, 1e-9),
        'elapsed_sec': time.time() - self.start,
    }
    self.report.epoch(last)
    meta = {'epoch': epoch + 1, 'epoch_complete': True, 'metrics': last}
    self.save(state, step, meta, metrics={'val_loss': val['loss']})
    every, num_epochs = self.config.samples_every_epochs, self.config.num_epochs
    if every and ((epoch + 1) % every == 0 or epoch + 1 == num_epochs):
      rows = self.plan.val_rows[: self.config.num_samples]
      grid = reporting.sample_grid(
          self.predict,
          jax.device_get(state.variables()),
          self.cache.images[rows],
          self.cache.embeddings[rows],
      )
      self.report.samples(epoch + 1, grid)
    return state, last

  def run(self, state, start_step, progress, resumed_losses=None):
    """Every epoch from `start_step` to the end: (state, the last epoch's metrics).
    `resumed_losses`: [loss sum, steps] of the epoch's steps before a mid-epoch `start_step`."""
    spe, last = self.plan.steps_per_epoch, None
    self.bar = self.report.progress(
        total=self.plan.total_steps, initial=start_step, enabled=progress
    )
    for epoch in range(start_step // spe, self.config.num_epochs):
      epoch_start = time.time()
      first = max(start_step - epoch * spe, 0)
      losses = list(resumed_losses) if first and resumed_losses else [0.0, 0]
      state, losses = self.train(state, epoch, first, losses)
      state, last = self.finish(state, epoch, losses, spe - first, time.time() - epoch_start)
      if epoch + 1 < self.config.num_epochs and self.stop.requested():
        raise self.stopped((epoch + 1) * spe, epoch + 1)
    return state, last

  def close(self):
    """Also when training stops with an error: the bar ends its line, the stream's workers stop,
    a checkpoint still being written is completed (or its failure named in one line), and then
    the signals get their handlers back: a signal in the meantime, one as the last checkpoint
    is written above all, is a stop request, not an end that would cut that checkpoint off."""
    try:
      if self.bar is not None:
        self.bar.close()
      self.feeder.close()
      checkpoints.wait(self.mngr)
    finally:
      self.mngr.close()
      self.report.close()
      self.stop.close()


def train_and_evaluate(config, workdir, progress=True, precompute_hint=PRECOMPUTE_HINT):
  """Trains (or resumes) in `workdir`; returns the final TrainState and the last epoch's metrics
  (None if there was nothing left to train). One training at a time in a workdir."""
  distributed.initialize(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  cache = open_training_cache(config, workdir, precompute_hint)
  plan = plan_run(config, cache)
  with checkpoints.workdir_lock(workdir):
    return _train(config, workdir, cache, plan, progress)


def _train(config, workdir, cache, plan, progress):
  log = print if jax.process_index() == 0 else (lambda *args: None)  # one process speaks for all
  if note := dtype_note(config, plan.devices[0].platform):
    log(note)
  model = model_lib.model_from_config(config)
  tx, plateau = train_step.make_optimizer(config)
  state = train_step.create_state(config, model, tx, plateau, distributed.replicated(plan.mesh))
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  streaming = plan.placement == 'streaming'
  state, stream_state, meta = restore_or_init(config, state, mngr, streaming, log)
  start_step = int(state.step)
  if start_step >= plan.total_steps:  # the same command run twice: nothing to load or compile
    mngr.close()
    log(
        f'nothing to train: config.num_epochs={config.num_epochs} ends at step '
        f'{plan.total_steps}; raise it to train further'
    )
    return state, None
  checkpoints.write_config(workdir, config)  # num_epochs etc. may have changed on resume
  feeder = make_feeder(config, cache, plan, start_step, stream_state)
  report = reporting.Reporter(workdir, enabled=jax.process_index() == 0)
  report.truncate_after(start_step)
  objective = training_objective(config, cache, plan, log)
  epochs = Epochs(config, plan, model, tx, plateau, mngr, feeder, report, cache, objective)
  log(
      f'training on {len(plan.devices)} {plan.devices[0].platform} device(s): '
      f'{len(plan.train_rows)} train / {len(plan.val_rows)} val images, global batch {plan.batch}, '
      f'{plan.steps_per_epoch} steps/epoch, data {plan.placement}, '
      f'steps {start_step}->{plan.total_steps}'
  )
  try:
    state, last = epochs.run(state, start_step, progress, (meta or {}).get('epoch_losses'))
  except TrainingDiverged as e:
    checkpoints.wait(mngr)  # the last epoch's checkpoint may still be being written
    kept = mngr.latest_step()
    kept = f'The last good checkpoint (step {kept}) is kept' if kept is not None else None
    raise TrainingDiverged(f'{e}. {kept or "No checkpoint had been written"}') from None
  finally:
    epochs.close()
  signals.work_done()  # every checkpoint is written
  log(
      f'done: epoch {last["epoch"]}, val_loss {last["val_loss"]:.5f}, val PSNR '
      f'{last["val_psnr"]:.2f} dB (grayscale baseline {last["val_psnr_gray"]:.2f} dB), '
      f'{time.time() - epochs.start:.0f}s'
  )
  return state, last


def precompute_command(argv):
  """The precompute command for this command line's config (its --config arguments, as given)."""
  args = []
  for i, a in enumerate(argv):
    if a.startswith('--config'):
      args.append(a)
      if a == '--config' and i + 1 < len(argv):
        args.append(argv[i + 1])
  args = [shlex.quote(a) for a in args] or ['--config CONFIG']
  return ' '.join(['python -m colorflax.precompute_features'] + args)


def define_flags(flags):
  cli.define_config(flags)
  absl_flags.DEFINE_string(
      'workdir', None, 'Directory for checkpoints, metrics and samples.', flag_values=flags
  )


def main(argv, flags):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.workdir:
    raise UserError('--workdir is required')
  config = cli.load_config(flags)
  workdir = cli.output_folder(flags.workdir, 'workdir')
  hint = precompute_command(sys.argv[1:] if flags['config'].present else [])
  try:
    train_and_evaluate(config, workdir, progress=True, precompute_hint=hint)
  except signals.Interrupted as e:  # stopped with a checkpoint: one line, from one process
    if jax.process_index() == 0:
      print(f'train.py: {e}', file=sys.stderr)
    return e.exit_code


def entry_point():
  cli.run(main, define_flags)


if __name__ == '__main__':
  entry_point()
