"""The jitted functions a training run is made of: the state, the optimizer, one dispatch of K
optimizer steps, validation, and the plateau scheduler's step.

Pure functions of (state, data): randomness is a function of (seed, step), so a resumed run
replays exactly what an uninterrupted one would have done. BatchNorm statistics are those of
the *global* batch (XLA reduces across devices), exactly as on one device with the same batch.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from colorflax import device_pipeline, hints, losses
from colorflax import model as model_lib

STEP_LOOPS = ('auto', 'device', 'host')  # config.step_loop


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any  # optax.contrib.reduce_on_plateau state, stepped on validation loss per epoch
  ema: Any = None  # config.ema_decay > 0: the moving average of `params`

  def variables(self):
    """What validation, checkpoints' model item, evaluate and colorize use: the averaged
    weights when there are any."""
    params = self.params if self.ema is None else self.ema
    return {'params': params, 'batch_stats': self.batch_stats}


def make_optimizer(config):
  """(Adam with an injectable learning rate, the reduce-on-plateau transformation)."""
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
  # torch's ReduceLROnPlateau lowers the rate once more than `patience` epochs failed to
  # improve; optax's once `patience` have: hence +1, so config.plateau means what torch means.
  p = config.plateau
  plateau = optax.contrib.reduce_on_plateau(
      factor=p.factor,
      patience=p.patience + 1,
      rtol=p.threshold,
      atol=0.0,
      cooldown=p.cooldown,
      min_scale=p.min_scale,
  )
  return tx, plateau


def create_state(config, model, tx, plateau, sharding):
  """A fresh TrainState from config.seed, laid out with `sharding` (replicated)."""

  def init(key):
    variables = model_lib.init_variables(model, key)
    params = variables['params']
    averaged = config.get('ema_decay', 0.0) > 0
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables['batch_stats'],
        opt_state=tx.init(params),
        plateau=plateau.init(params),
        ema=jax.tree_util.tree_map(lambda p: p + 0, params) if averaged else None,  # own buffers
    )

  return jax.jit(init, out_shardings=sharding)(jax.random.key(config.seed))


def set_learning_rate(state, base_lr):
  """`state` with Adam's rate set to base_lr x the plateau's scale (a jitted caller's helper)."""
  opt_state = state.opt_state
  opt_state.hyperparams['learning_rate'] = jnp.asarray(base_lr * state.plateau.scale, jnp.float32)
  return state.replace(opt_state=opt_state)


def step_loop(config) -> str:
  """Where a dispatch's K steps loop: 'device' (one lax.scan) or 'host' (K jitted steps queued
  back to back). XLA:CPU runs a while loop's body ~30x slower than the same ops outside one
  (quickstart: 9.7 vs 0.30 s/step), and unrolling the K steps into one program instead
  multiplies its compile time and memory by K (128 px, K=8: 5.0 GB RSS), so CPUs loop on the
  host, where a dispatch costs nothing next to a step."""
  if config.step_loop == 'auto':
    return 'host' if jax.devices()[0].platform == 'cpu' else 'device'
  return config.step_loop


def _step_fn(model, tx, config, objective):
  """(state, tables, x) -> (state, loss): one optimizer step on the batch `x` selects."""
  base_key = jax.random.key(config.seed)
  aug = config.augment
  decay = config.get('ema_decay', 0.0)

  hint_values = hints.config_values(config) if model.hints else None

  def one_step(state, tables, x):
    key = jax.random.fold_in(base_key, state.step)  # randomness is a function of the step
    images, emb = device_pipeline.gather(tables, x)
    l_norm, ab_norm, _ = device_pipeline.lab_batch(images, key, aug, train=True)
    given = hints.simulate(key, ab_norm, *hint_values) if hint_values else None

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      output, updates = model.apply(
          variables, l_norm, emb, train=True, hints=given, mutable=['batch_stats']
      )
      return objective.batch_loss(output, ab_norm), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    new = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
    )
    return new, loss

  return one_step


def make_train_step(model, tx, config, objective=None):
  """jit(state, tables, xs, i) -> (state, loss): step i of a dispatch's xs (make_train_chunk)."""
  one_step = _step_fn(model, tx, config, objective or losses.objective(config))

  def step(state, tables, xs, i):
    return one_step(state, tables, jax.tree_util.tree_map(lambda a: a[i], xs))

  return jax.jit(step, donate_argnums=(0,))


def make_train_chunk(model, tx, config, objective=None):
  """(state, tables, xs) -> (state, the K losses): one dispatch of K steps. `xs` holds each
  step's batch: (K, B) row indices into the resident `tables`, or the streamed (images,
  embeddings) themselves with `tables` None (see device_pipeline.gather). `objective`: the
  run's losses.Objective (default: the config's, without rebalancing weights)."""
  objective = objective or losses.objective(config)
  if step_loop(config) == 'host':
    step = make_train_step(model, tx, config, objective)

    def host_chunk(state, tables, xs):
      losses = []
      for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
        state, loss = step(state, tables, xs, i)  # queued: nothing here waits for the device
        losses.append(loss)
      return state, losses

    return host_chunk
  one_step = _step_fn(model, tx, config, objective)

  def chunk(state, tables, xs):
    return jax.lax.scan(lambda state, x: one_step(state, tables, x), state, xs)

  return jax.jit(chunk, donate_argnums=(0,))


def make_evaluate(model, objective=None, config=None):
  """jit(variables, tables, x, mask (B,), index) -> per-batch sums of validation's per-image
  metrics (losses.image_metrics, the loss `objective`'s; x: as one step of make_train_chunk's
  xs) for validation batch `index`.

  A model with hints is validated with hints simulated as in training (`config.hints`), from
  keys of (seed, batch index): the same ones every epoch.

  Called once per validation batch from Python (not a scan: see step_loop); the sums stay on
  the device and are added up there, so the host reads one number per metric per epoch.
  """

  objective = objective or losses.Objective()
  hint_values = hints.config_values(config) if model.hints else None
  base_key = jax.random.fold_in(jax.random.key(config.seed if config else 0), 0x7A1)

  def evaluate(variables, tables, x, mask, index):
    images, emb = device_pipeline.gather(tables, x)
    l_norm, ab_norm, rgb = device_pipeline.lab_batch(images, None, None, train=False)
    given = None
    if hint_values:
      given = hints.simulate(jax.random.fold_in(base_key, index), ab_norm, *hint_values)
    output = model.apply(variables, l_norm, emb, train=False, hints=given)
    loss = objective.per_image_loss(output, ab_norm)
    metrics = losses.image_metrics(objective.decode(output), l_norm, ab_norm, rgb, loss=loss)
    return {k: jnp.sum(v * mask) for k, v in metrics.items()}

  return jax.jit(evaluate)


def plateau_step(plateau, base_lr):
  """jit(state, val_loss) -> state with the plateau stepped and Adam's rate set from it."""

  def update(state, val_loss):
    _, new_plateau = plateau.update(updates={}, state=state.plateau, value=val_loss)
    return set_learning_rate(state.replace(plateau=new_plateau), base_lr)

  return jax.jit(update, donate_argnums=(0,))


def eval_masks(n, batch):
  """(batches, batch) float32: 1 for the n validation rows, 0 for the padding of the last batch."""
  mask = np.zeros(-(-n // batch) * batch, np.float32)
  mask[:n] = 1.0
  return mask.reshape(-1, batch)
