"""`python -m colorflax.train --config CFG --workdir DIR`: the seed recipe on the accelerator.

Data-parallel over every device: one `jax.jit` program over a 1-D `Mesh('data')`, the batch
sharded and the state replicated. BatchNorm statistics are therefore those of the *global*
batch (XLA reduces across devices), exactly as on one device with the same batch.

One host dispatch runs `steps_per_dispatch` optimizer steps in a `lax.scan`; the losses stay
on the device and are read one dispatch late, so the host never stalls the device. Every
epoch: validation on the device, the plateau scheduler, metrics, a checkpoint.
Randomness is a function of (seed, step) and data order of (seed, epoch), so a resumed run
replays exactly what an uninterrupted one would have done.
"""

import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from colorflax import checkpoints, cli, color, config_validation, device_pipeline, features_cache
from colorflax import model as model_lib
from colorflax import metrics, preemption, reporting
from colorflax.errors import UserError

_CONFIG = cli.define_config_flag()
_WORKDIR = cli.define_string('workdir', None, 'Directory for checkpoints, metrics and samples.')

# Changing these makes a checkpoint meaningless for this run; everything else may change on resume.
RESUME_KEYS = ('seed', 'data.image_size', 'data.val_fraction', 'features.kind', 'model.width',
               'model.dtype', 'batch_size', 'per_device_batch_size')


class TrainingDiverged(UserError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any  # optax.contrib.reduce_on_plateau state, stepped on validation loss per epoch

  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def make_optimizer(config):
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
  # torch's ReduceLROnPlateau lowers the rate once more than `patience` epochs failed to
  # improve; optax's once `patience` have: hence +1, so config.plateau means what torch means.
  plateau = optax.contrib.reduce_on_plateau(
      factor=config.plateau.factor, patience=config.plateau.patience + 1, rtol=config.plateau.threshold,
      atol=0.0, cooldown=config.plateau.cooldown, min_scale=config.plateau.min_scale)
  return tx, plateau


def global_batch_size(config, num_devices):
  batch = config.per_device_batch_size * num_devices if config.per_device_batch_size else config.batch_size
  if batch % num_devices:
    raise UserError(f'config.batch_size: {batch} does not split evenly over {num_devices} devices; '
                    f'use a multiple of {num_devices} or set per_device_batch_size')
  return batch


def run_devices(config):
  """The devices a run uses: the first config.num_devices (0 = all of them)."""
  devices = jax.devices()
  if config.num_devices > len(devices):
    raise UserError(f'config.num_devices: {config.num_devices} requested, {len(devices)} available')
  return devices[:config.num_devices or len(devices)]


def create_state(config, model, tx, plateau, image_size, replicated):
  def init(key):
    variables = model.init(key, jnp.zeros((1, min(image_size, 64), min(image_size, 64), 1)),
                           jnp.zeros((1, model.embedding_dim)), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']),
                      plateau=plateau.init(variables['params']))
  return jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))


def step_loop(config) -> str:
  """Where a dispatch's K steps loop: 'device' (one lax.scan) or 'host' (K jitted steps queued
  back to back). XLA:CPU runs a while loop's body ~30x slower than the same ops outside one
  (quickstart: 9.7 vs 0.30 s/step), and unrolling the K steps into one program instead
  multiplies its compile time and memory by K (128 px, K=8: 5.0 GB RSS), so CPUs loop on the
  host, where a dispatch costs nothing next to a step."""
  if config.step_loop == 'auto':
    return 'host' if jax.devices()[0].platform == 'cpu' else 'device'
  return config.step_loop


def _step_fn(model, tx, config):
  """(state, tables, x) -> (state, loss): one optimizer step on the batch `x` selects."""
  base_key = jax.random.key(config.seed)
  aug = config.augment

  def one_step(state, tables, x):
    key = jax.random.fold_in(base_key, state.step)  # randomness is a function of the step
    images, emb = device_pipeline.gather(tables, x)
    l_norm, ab_norm, _ = device_pipeline.lab_batch(images, key, aug, train=True)

    def loss_fn(params):
      pred, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, l_norm, emb,
                                  train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(pred - ab_norm)), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), loss

  return one_step


def make_train_step(model, tx, config):
  """jit(state, tables, xs, i) -> (state, loss): step i of a dispatch's xs (see make_train_chunk)."""
  one_step = _step_fn(model, tx, config)

  def step(state, tables, xs, i):
    return one_step(state, tables, jax.tree_util.tree_map(lambda a: a[i], xs))

  return jax.jit(step, donate_argnums=(0,))


def make_train_chunk(model, tx, config):
  """(state, tables, xs) -> (state, the K losses): one dispatch of K steps. `xs` holds each
  step's batch: (K, B) row indices into the resident `tables`, or the streamed (images,
  embeddings) themselves with `tables` None (see device_pipeline.gather)."""
  if step_loop(config) == 'host':
    step = make_train_step(model, tx, config)

    def host_chunk(state, tables, xs):
      losses = []
      for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
        state, loss = step(state, tables, xs, i)  # queued: nothing here waits for the device
        losses.append(loss)
      return state, losses

    return host_chunk
  one_step = _step_fn(model, tx, config)

  def chunk(state, tables, xs):
    return jax.lax.scan(lambda state, x: one_step(state, tables, x), state, xs)

  return jax.jit(chunk, donate_argnums=(0,))


def make_evaluate(model):
  """jit(variables, tables, x, mask (B,)) -> per-batch sums of per-image metrics (x: as one step of
  make_train_chunk's xs).

  Called once per validation batch from Python (not a scan: see step_loop); the sums stay on
  the device and are added up there, so the host reads one number per metric per epoch.
  """

  def evaluate(variables, tables, x, m):
    images, emb = device_pipeline.gather(tables, x)
    rgb_true = color.uint8_to_unit(images)
    l_norm, ab_norm = color.normalize_lab(color.rgb_to_lab(rgb_true))
    pred = model.apply(variables, l_norm, emb, train=False)
    mse = jnp.mean(jnp.square(pred - ab_norm), axis=(1, 2, 3))
    psnr = metrics.psnr(color.lab_norm_to_rgb(l_norm, pred), rgb_true)
    psnr_gray = metrics.psnr(color.lab_norm_to_rgb(l_norm, jnp.zeros_like(pred)), rgb_true)
    return {'loss': jnp.sum(mse * m), 'psnr': jnp.sum(psnr * m), 'psnr_gray': jnp.sum(psnr_gray * m)}

  return jax.jit(evaluate)


def make_predict(model):
  return jax.jit(lambda variables, l_norm, emb: model.apply(variables, l_norm, emb, train=False))


def plateau_step(plateau, base_lr):
  """jit(state, val_loss) -> state with the plateau stepped and Adam's rate set from it."""

  def update(state, val_loss):
    _, new_plateau = plateau.update(updates={}, state=state.plateau, value=val_loss)
    opt_state = state.opt_state
    opt_state.hyperparams['learning_rate'] = jnp.asarray(base_lr * new_plateau.scale, jnp.float32)
    return state.replace(plateau=new_plateau, opt_state=opt_state)

  return jax.jit(update, donate_argnums=(0,))


def _eval_masks(n, batch):
  """1 for the validation rows of each batch, 0 for the padding of the last."""
  mask = np.zeros(-(-n // batch) * batch, np.float32)
  mask[:n] = 1.0
  return mask.reshape(-1, batch)


def precompute_command():
  """The precompute command for this run's config (its --config arguments, as given)."""
  args, argv = [], sys.argv[1:] if _CONFIG.present else []
  for i, a in enumerate(argv):
    if a.startswith('--config'):
      args.append(a)
      if a == '--config' and i + 1 < len(argv):
        args.append(argv[i + 1])
  return ' '.join(['python -m colorflax.precompute_features'] + (args or ['--config CONFIG']))


def check_resume_compatible(workdir, config):
  path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not os.path.isfile(path):
    return
  old = checkpoints.read_config(workdir)
  for key in RESUME_KEYS:
    if config_validation.key_missing(old, key):
      continue
    a, b = config_validation.get_field(old, key), config_validation.get_field(config, key)
    if a != b:
      raise UserError(f'{workdir} was trained with {key}={a!r}, this config has {b!r}: '
                      f'resume with the same value or use a new --workdir')


def init_from_checkpoint(config, state):
  """(state with the parameters and BatchNorm statistics of config.init_from's checkpoint, its
  step). The optimizer and plateau states stay fresh: Adam's moments and the plateau's count
  start from zero whatever the weights. Restored onto `state`'s shardings."""
  source = config.init_from
  source_config = checkpoints.read_config(source)
  for key in ('model.width', 'features.kind'):  # what the parameters' shapes and meaning hang on
    theirs, ours = config_validation.get_field(source_config, key), config_validation.get_field(config, key)
    if theirs != ours:
      raise UserError(f'config.init_from: {source} has {key}={theirs!r}, this config {ours!r}; '
                      f'set {key}={theirs!r} to start from its weights')
  variables, _, step = checkpoints.restore_model(source, config.get('init_checkpoint', 'best'), state.variables())
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats']), step


def initialize_distributed(config):
  """jax.distributed.initialize() once, when the config asks for several processes."""
  if not config.distributed or jax.distributed.is_initialized():
    return
  # CPU devices in different processes need a collectives library to talk to each other (GPUs
  # and TPUs bring their own; this setting does not touch them).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  explicit = {}
  if config.coordinator_address:
    explicit = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                    process_id=config.process_id)
  jax.distributed.initialize(**explicit)


def dtype_note(config, platform):
  """A line for runs whose dtype buys nothing on their backend, else None."""
  if config.model.dtype == 'bfloat16' and platform == 'cpu':
    return ('note: model.dtype=bfloat16 is no faster than float32 on XLA:CPU, whose convolutions '
            'do not use bf16/AMX units (BENCHMARKS.md); float32 trains as fast, at full precision')
  return None


def train_and_evaluate(config, workdir, progress=True):
  """Trains (or resumes) in `workdir`; returns the final TrainState and the last epoch's metrics."""
  initialize_distributed(config)
  log = print if jax.process_index() == 0 else (lambda *args: None)  # one process speaks for all
  workdir = os.path.abspath(os.path.expanduser(workdir))
  cache = features_cache.open_cache(config.data.cache_dir, precompute_command())
  features_cache.check_matches_config(cache, config, precompute_command())
  features_cache.check_built_for(cache, config, precompute_command())
  if checkpoints.holds_weights_only(workdir):
    raise UserError(f'{workdir} holds imported weights (convert_torch), not a training run to resume: '
                    f'to train from them, use a new --workdir with --config.init_from={workdir}')
  check_resume_compatible(workdir, config)

  devices = run_devices(config)
  if note := dtype_note(config, devices[0].platform):
    log(note)
  # Auto axes: XLA propagates the batch sharding through the gather, model and loss itself.
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = global_batch_size(config, len(devices))
  eval_batch = config.eval_batch_size or batch
  if eval_batch % len(devices):
    raise UserError(f'config.eval_batch_size: {eval_batch} does not split evenly over {len(devices)} devices')

  train_rows, val_rows = device_pipeline.split_indices(cache.num_images, config.data.val_fraction, config.seed)
  steps_per_epoch = len(train_rows) // batch
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size: {batch} is larger than the {len(train_rows)} training images')
  total_steps = steps_per_epoch * config.num_epochs
  nbytes = cache.images.nbytes + cache.embeddings.nbytes
  mode = device_pipeline.decide_resident(config.data.placement, nbytes, config.data.device_budget_fraction)
  model = model_lib.model_from_config(config)
  tx, plateau = make_optimizer(config)
  state = create_state(config, model, tx, plateau, config.data.image_size, replicated)

  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  stream_state = None
  if mode == 'streaming':
    from colorflax import streaming  # grain: imported only by runs that stream
  if mngr.latest_step() is not None:
    wanted = streaming.IteratorState() if mode == 'streaming' else None
    state, meta, stream_state = checkpoints.restore_train(mngr, state, data=wanted)
    log(f'resumed from step {int(state.step)} (epoch {meta["epoch"]}) in {workdir}')
  elif config.get('init_from'):
    state, init_step = init_from_checkpoint(config, state)
    log(f'starting from the weights of {config.init_from} (checkpoint step {init_step})')
  start_step = int(state.step)
  if start_step >= total_steps:  # e.g. the same command run twice: no data to load, nothing to compile
    mngr.close()
    log(f'nothing to train: config.num_epochs={config.num_epochs} ends at step {total_steps}; '
        f'raise it to train further')
    return state, None
  checkpoints.write_config(workdir, config)  # num_epochs etc. may have changed on resume
  if mode == 'resident':
    feeder = device_pipeline.ResidentFeeder(cache, train_rows, val_rows, mesh, config, batch, steps_per_epoch,
                                            eval_batch)
  else:
    feeder = streaming.StreamFeeder(os.path.abspath(cache.directory), train_rows, val_rows, mesh, config, batch, steps_per_epoch,
                                    eval_batch, total_steps, start_step, stream_state)
  report = reporting.Reporter(workdir, enabled=jax.process_index() == 0)
  report.truncate_after(start_step)

  train_chunk = make_train_chunk(model, tx, config)
  evaluate = make_evaluate(model)
  predict = make_predict(model)
  step_plateau = plateau_step(plateau, config.learning_rate)
  eval_masks = [device_pipeline.global_array(m, NamedSharding(mesh, P('data')))
                for m in _eval_masks(len(val_rows), eval_batch)]
  sample_rows = val_rows[:config.num_samples]

  def validate(state):
    totals, in_flight = {}, device_pipeline.InFlight()  # a streamed split is not all read ahead
    for mask, (tables, x) in zip(eval_masks, feeder.eval_batches()):
      sums = evaluate(state.variables(), tables, x, mask)
      totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
      in_flight.add(sums)
    return {k: float(v) / len(val_rows) for k, v in jax.device_get(totals).items()}

  stop = preemption.StopRequest(mngr)  # from here, SIGTERM, Ctrl-C and SIGHUP stop with a checkpoint
  log(f'training on {len(devices)} {devices[0].platform} device(s): {len(train_rows)} train / '
        f'{len(val_rows)} val images, global batch {batch}, {steps_per_epoch} steps/epoch, data {mode}, '
        f'steps {start_step}->{total_steps}')
  run_start = time.time()
  last = None
  bar = report.progress(total=total_steps, initial=start_step, enabled=progress)
  try:
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
      epoch_start = time.time()
      first = max(start_step - epoch * steps_per_epoch, 0)  # > 0 only when resuming mid-epoch
      sizes = device_pipeline.dispatch_sizes(first, steps_per_epoch, config.steps_per_dispatch)
      losses, pending, step_now = [], None, epoch * steps_per_epoch + first
      for n, (tables, xs) in zip(sizes, feeder.train_dispatches(step_now, sizes)):
        state, chunk_losses = train_chunk(state, tables, xs)
        if pending is not None:  # read the previous dispatch while this one runs
          _check_finite(pending, losses, bar, batch)
        pending = (step_now, chunk_losses)
        step_now += n  # counted on the host: reading state.step would wait for the device
        every = config.checkpoint_every_steps
        mid_epoch = step_now % steps_per_epoch  # at an epoch's end, its validation comes first
        stopping = stop.requested() and mid_epoch
        if stopping or (every and step_now // every > (step_now - n) // every and mid_epoch):
          _check_finite(pending, losses, bar, batch)
          pending = None
          checkpoints.save(mngr, step_now, model=state.variables(), train=checkpoints.train_item(state),
                           data=feeder.checkpoint_state(), meta={'epoch': epoch, 'epoch_complete': False})
        if stopping:
          raise Stopped(stop, step_now, epoch, steps_per_epoch)
      if pending is not None:
        _check_finite(pending, losses, bar, batch)
      train_seconds = time.time() - epoch_start
      val = validate(state)
      if not np.isfinite(val['loss']):
        raise TrainingDiverged(f'validation loss is {val["loss"]} after epoch {epoch + 1} (step {step_now}); stopping')
      state = step_plateau(state, jnp.asarray(val['loss'], jnp.float32))
      lr = float(state.opt_state.hyperparams['learning_rate'])
      epoch_steps = steps_per_epoch - first
      last = {
          'epoch': epoch + 1, 'step': step_now, 'lr': lr,
          'train_loss': float(np.mean(losses)) if losses else float('nan'),
          'val_loss': val['loss'], 'val_psnr': val['psnr'], 'val_psnr_gray': val['psnr_gray'],
          'images_per_sec': epoch_steps * batch / max(train_seconds, 1e-9),
          'elapsed_sec': time.time() - run_start,
      }
      checkpoints.save(mngr, step_now, model=state.variables(), train=checkpoints.train_item(state),
                       data=feeder.checkpoint_state(), meta={'epoch': epoch + 1, 'epoch_complete': True, 'metrics': last},
                       metrics={'val_loss': val['loss']})
      report.epoch(last)
      if config.samples_every_epochs and ((epoch + 1) % config.samples_every_epochs == 0 or epoch + 1 == config.num_epochs):
        report.samples(epoch + 1, reporting.sample_grid(predict, jax.device_get(state.variables()),
                                                        cache.images[sample_rows], cache.embeddings[sample_rows]))
      if epoch + 1 < config.num_epochs and stop.requested():
        raise Stopped(stop, step_now, epoch + 1, steps_per_epoch)
  except TrainingDiverged as e:
    checkpoints.wait(mngr)  # the last epoch's checkpoint may still be being written
    kept = mngr.latest_step()
    raise TrainingDiverged(f'{e}. ' + (f'The last good checkpoint (step {kept}) is kept' if kept is not None
                                       else 'No checkpoint had been written')) from None
  finally:  # also when training stops with an error: the signals get their handlers back, the bar
    stop.close()  # ends its line, the stream's workers stop, and a checkpoint still being written is
    bar.close()  # completed (or its failure named in one line)
    feeder.close()
    checkpoints.wait(mngr)
    mngr.close()
    report.close()
  if last is not None:
    log(f'done: epoch {last["epoch"]}, val_loss {last["val_loss"]:.5f}, val PSNR {last["val_psnr"]:.2f} dB '
          f'(grayscale baseline {last["val_psnr_gray"]:.2f} dB), {time.time() - run_start:.0f}s')
  return state, last


class Stopped(Exception):
  """Training stopped on request (SIGTERM, Ctrl-C, a lost terminal) after saving a checkpoint at `step`."""

  def __init__(self, stop, step, epoch, steps_per_epoch):
    where = f'in epoch {epoch + 1}' if step % steps_per_epoch else f'after epoch {epoch}'
    super().__init__(f'stopped by {stop.signal_name} at step {step} ({where}) with a checkpoint; '
                     f'run the same command again to resume')
    self.step, self.exit_code = step, stop.exit_code


def _check_finite(pending, losses, bar, batch):
  first_step, chunk_losses = pending
  values = np.asarray(jax.device_get(chunk_losses))
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise TrainingDiverged(f'loss became {values[bad[0]]} at step {first_step + int(bad[0]) + 1}; stopping')
  losses.extend(values.tolist())
  bar.update(len(values), loss=float(values[-1]), images=len(values) * batch)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  config = cli.load_config(_CONFIG)
  try:
    train_and_evaluate(config, cli.output_folder(_WORKDIR.value, 'workdir'), progress=True)
  except Stopped as e:
    if jax.process_index() == 0:
      print(f'train.py: {e}', file=sys.stderr)
    return e.exit_code


def entry_point():
  cli.run(main)


if __name__ == '__main__':
  entry_point()
