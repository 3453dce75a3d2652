"""Orbax checkpoints under `WORKDIR/checkpoints`: the model, the training state, and metadata.

Each step holds up to four items, so that every reader restores only what it needs:
  model  {'params', 'batch_stats'}      what evaluation and colorization need
  train  optimizer, plateau, step       what resuming training needs (absent after convert_torch)
  meta   JSON: epoch, metrics, ...
  data   the grain stream's state, one JSON file per process (streaming runs only)
Orbax writes each step to a temporary directory and renames it when complete, so a step cut
off mid-write is never listed: readers fall back to the previous complete one.
"""

import contextlib
import json
import logging as std_logging
import os
import re
import shlex

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from colorflax import files
from colorflax.errors import UserError

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'  # held by the command writing into the workdir (workdir_lock)
IMPORTED = 'convert_torch'  # meta['source'] of a checkpoint convert_torch wrote
WHICH = ('best', 'latest')  # --checkpoint and config.init_checkpoint: these, or a step number

# Changing these makes a checkpoint meaningless for a run; everything else may change on resume.
RESUME_KEYS = (
    'loss',
    'model.hints',
    'ema_decay',
    'seed',
    'data.image_size',
    'data.val_fraction',
    'features.kind',
    'model.width',
    'model.dtype',
    'batch_size',
    'per_device_batch_size',
)
# What the parameters' shapes and meaning hang on: a run started from another's weights
# (config.init_from) must have the same, and evaluate and colorize cannot override them (nor
# the loss, which says what the model's output is).
INIT_FROM_KEYS = ('model.width', 'features.kind', 'model.hints')
# A recorded config without these fields (written before they existed) meant these values.
DEFAULTS = {'loss': 'mse', 'ema_decay': 0.0, 'model.hints': False}


def field(config, key):
  """config's `key` (dotted), or what a config written before the field existed meant."""
  from colorflax import config_validation

  if key in DEFAULTS and config_validation.key_missing(config, key):
    return DEFAULTS[key]
  return config_validation.get_field(config, key)


def checkpoint_dir(workdir) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


class _QuietOrbax(std_logging.Filter):
  """Drops two kinds of orbax log records. Its warning that a checkpoint was saved without
  metrics: mid-epoch checkpoints have no validation loss, by design. And the tracebacks its
  background threads log when a write fails (a full disk: ~470 lines for one checkpoint), which
  `wait` turns into one line naming the failure and the checkpoint kept."""

  def filter(self, record):
    if 'did not provide metrics' in record.getMessage():
      return False
    return not (record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname)


logging.get_absl_logger().addFilter(_QuietOrbax())


def manager(workdir, *, keep: int = 3, read_only: bool = False, async_writes: bool = True):
  """A CheckpointManager keeping the latest `keep` steps and the best one by validation loss."""
  preservation = policies.AnyPreservationPolicy(
      [
          policies.LatestN(n=keep),
          policies.BestN(
              get_metric_fn=lambda m: m['val_loss'],
              reverse=True,
              n=1,
              keep_checkpoints_without_metrics=False,
          ),
      ]
  )
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda m: m['val_loss'],
      best_mode='min',
      preservation_policy=preservation,
      enable_async_checkpointing=async_writes,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else 1,
  )
  # Readers (evaluate, colorize) open read-only, and orbax warns about that on every open.
  level = logging.get_verbosity()
  if read_only:
    logging.set_verbosity(logging.ERROR)
  try:
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=('model', 'train', 'meta', 'data')
    )
  finally:
    logging.set_verbosity(level)


def save(mngr, step: int, *, model, meta: dict, train=None, data=None, metrics=None):
  wait(mngr)  # orbax would raise the previous write's failure here, as a screenful from its threads
  items = {'model': ocp.args.StandardSave(model), 'meta': ocp.args.JsonSave(meta)}
  if train is not None:
    items['train'] = ocp.args.StandardSave(train)
  if data is not None:  # streaming.IteratorState, written by grain's orbax handler
    import grain

    items['data'] = grain.checkpoint.CheckpointSave(data)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def wait(mngr):
  """Waits for the checkpoint being written in the background. A write that failed (a full
  disk, a lost mount) is one line naming the checkpoint kept; its cut-off step is ignored on resume.
  """
  try:
    mngr.wait_until_finished()
  except Exception as e:  # orbax re-raises its writer threads' errors (ValueError, OSError, ...)
    text = str(e)
    code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's, for a failed file write
    reason = (
        os.strerror(int(code.group(1)))
        if code
        else (text.splitlines() or [type(e).__name__])[0][:300]
    )
    mngr.reload()
    kept = mngr.latest_step()
    raise UserError(
        f'cannot write a checkpoint in {mngr.directory}: {reason}; '
        + (
            f'the last complete one (step {kept}) is kept: '
            if kept is not None
            else 'none was completed: '
        )
        + 'make room and run the same command again'
    ) from None


def resolve_step(mngr, which='latest') -> int:
  """'latest', 'best' or a step number -> a step that exists, or a UserError saying what does."""
  steps = mngr.all_steps()
  if not steps:
    raise UserError(f'no complete checkpoint in {mngr.directory}')
  if which == 'latest':
    return mngr.latest_step()
  if which == 'best':  # imported weights (convert_torch) have no validation loss: the latest
    best = mngr.best_step()
    return mngr.latest_step() if best is None else best
  try:
    step = int(which)
  except (TypeError, ValueError):
    raise UserError(
        f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}"
    ) from None
  if step not in steps:
    raise UserError(f'no checkpoint at step {step} in {mngr.directory}; there are {sorted(steps)}')
  return step


def restore_model(workdir, which='latest', target=None):
  """(variables, meta, step) from `workdir`. `target`: abstract or concrete variables that
  give shapes and shardings (so a checkpoint restores onto any device layout)."""
  mngr = manager(workdir, read_only=True)
  step = resolve_step(mngr, which)
  model_args = (
      ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
  )
  with _readable(mngr, step, 'choose another with --checkpoint'):
    restored = mngr.restore(
        step, args=ocp.args.Composite(model=model_args, meta=ocp.args.JsonRestore())
    )
  mngr.close()
  return restored['model'], restored['meta'], step


@contextlib.contextmanager
def _readable(mngr, step, advice):
  """A checkpoint that is listed (complete) but cannot be restored (files damaged or removed
  after it was written) -> one line naming it and the other steps; nothing is deleted."""
  try:
    yield
  except Exception as e:  # orbax, tensorstore and the handlers raise many types for this
    while e.__cause__ is not None:  # tensorstore's own message names the file and what is wrong
      e = e.__cause__
    text = (
        e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    )
    reason = (text.strip().splitlines() or [type(e).__name__])[0].split(' [tensorstore_spec')[0]
    reason = reason if len(reason) <= 400 else reason[:400] + '...'
    others = [x for x in mngr.all_steps() if x != step]
    raise UserError(
        f'checkpoint step {step} in {mngr.directory} cannot be read ({reason}); {advice}'
        + (f' (the others: {sorted(others)})' if others else '')
    ) from None


def write_config(workdir, config):
  """The resolved config as JSON, next to the checkpoints (process 0 only)."""
  if jax.process_index() != 0:
    return
  with files.atomic(os.path.join(workdir, CONFIG_FILE)) as f:
    f.write(config.to_json(indent=2, sort_keys=True))


def workdir_lock(workdir):
  """One command at a time writes into a workdir (train, convert_torch): colorflax.locks. With
  several processes, process 0 holds it for the run (they write one run together)."""
  from colorflax import locks

  if jax.process_index() != 0:
    return contextlib.nullcontext()
  files.create_folder(workdir, 'workdir')
  return locks.exclusive(
      os.path.join(workdir, LOCK_FILE),
      f'the workdir {workdir}',
      'wait for the other command to finish, or use another --workdir',
  )


def read_config(workdir):
  """The ConfigDict a workdir was trained (or converted) with."""
  import ml_collections

  if os.path.isfile(os.path.expanduser(workdir)):
    hint = (
        '; import a PyTorch checkpoint first with '
        f'`python -m colorflax.convert_torch {shlex.quote(workdir)} --workdir DIR`, '
        f'then give DIR'
        if workdir.endswith(('.pth', '.pt'))
        else ''
    )
    raise UserError(
        f'{workdir} is a file; a colorflax workdir (of train or convert_torch) is a folder{hint}'
    )
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(
        f'{workdir} has no {CONFIG_FILE}: is it a colorflax workdir (train or convert_torch)?'
    )
  with open(path) as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise UserError(f'{path} is not valid JSON ({e})') from None


def holds_weights_only(workdir) -> bool:
  """Whether `workdir`'s newest checkpoint is imported weights (convert_torch's meta says so),
  with no training state to resume. A training checkpoint that lost its state since is damaged
  instead: that is not decided here, restore_train reports it."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return False
  mngr = manager(workdir, read_only=True)
  try:
    step = mngr.latest_step()
    if step is None:
      return False
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return isinstance(meta, dict) and meta.get('source') == IMPORTED
  except Exception:  # an unreadable meta: left for restore_train to report, with the step named
    return False
  finally:
    mngr.close()


def train_item(state) -> dict:
  """The part of a TrainState that only resuming needs (with a moving average of the weights,
  the model item holds the average, and this the weights being trained)."""
  item = {'step': state.step, 'opt_state': state.opt_state, 'plateau': state.plateau}
  if state.ema is not None:
    item['params'] = state.params
  return item


def _has_data_state(mngr, step) -> bool:
  """Whether `step` holds this process's stream state (grain's handler names the file so)."""
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return os.path.exists(os.path.join(str(mngr.directory), str(step), 'data', name))


def restore_train(mngr, state, step=None, data=None):
  """(state, meta, data) restored from `step` (default: latest complete); `state` gives structure
  and shardings. `data`: a streaming.IteratorState to fill in, returned only if the step has
  one for this process (a run resumed on another process count restarts its stream at the step)."""
  step = mngr.latest_step() if step is None else step
  items = dict(
      model=ocp.args.StandardRestore(state.variables()),
      train=ocp.args.StandardRestore(train_item(state)),
      meta=ocp.args.JsonRestore(),
  )
  with_data = data is not None and _has_data_state(mngr, step)
  if with_data:
    import grain

    items['data'] = grain.checkpoint.CheckpointRestore(data)
  with _readable(
      mngr,
      step,
      f'move {os.path.join(str(mngr.directory), str(step))} aside to resume from '
      'the one before it',
  ):
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  model, train = restored['model'], restored['train']
  averaged = 'params' in train  # the model item is the moving average
  state = state.replace(
      step=train['step'],
      params=train['params'] if averaged else model['params'],
      ema=model['params'] if averaged else None,
      batch_stats=model['batch_stats'],
      opt_state=train['opt_state'],
      plateau=train['plateau'],
  )
  return state, restored['meta'], restored['data'] if with_data else None


def restore_for_inference(workdir, config, which, mesh):
  """(model, variables, step): the model `config` describes, its variables from `workdir`
  restored replicated onto `mesh`, whatever device layout the checkpoint was written from."""
  from colorflax import distributed
  from colorflax import model as model_lib

  model = model_lib.model_from_config(config)
  abstract = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))
  replicated = distributed.replicated(mesh)
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
  )
  variables, _, step = restore_model(workdir, which, target)
  return model, variables, step


def check_can_train_in(workdir, config):
  """Refuses a workdir that `config` cannot train in: imported weights (convert_torch), or a run
  trained with other RESUME_KEYS."""
  from colorflax import config_validation

  if holds_weights_only(workdir):
    raise UserError(
        f'{workdir} holds imported weights (convert_torch), not a training run to resume: '
        f'to train from them, use a new --workdir with --config.init_from={shlex.quote(workdir)}'
    )
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  old = read_config(workdir)
  for key in RESUME_KEYS:
    if config_validation.key_missing(old, key) and key not in DEFAULTS:
      continue
    a, b = field(old, key), field(config, key)
    if a != b:
      raise UserError(
          f'{workdir} was trained with {key}={a!r}, this config has {b!r}: '
          f'resume with the same value or use a new --workdir'
      )


def restore_init_from(config, target):
  """(variables, step) of config.init_from's checkpoint (config.init_checkpoint), a training
  run's or an imported prototype's, restored onto `target`'s shapes and shardings; its
  INIT_FROM_KEYS must be this config's."""
  source = config.init_from
  source_config = read_config(source)
  from colorflax import losses

  head = lambda c: 'classification' if losses.objective(c).classes else 'regression'
  if head(source_config) != head(config):  # their last layers differ
    theirs, ours = field(source_config, 'loss'), field(config, 'loss')
    raise UserError(
        f'config.init_from: {source} was trained with loss={theirs!r} ({head(source_config)}), '
        f'this config has {ours!r} ({head(config)}): their outputs differ'
    )
  for key in INIT_FROM_KEYS:
    theirs, ours = field(source_config, key), field(config, key)
    if theirs != ours:
      raise UserError(
          f'config.init_from: {source} has {key}={theirs!r}, this config {ours!r}; '
          f'set {key}={theirs!r} to start from its weights'
      )
  variables, _, step = restore_model(source, config.get('init_checkpoint', 'best'), target)
  return variables, step
