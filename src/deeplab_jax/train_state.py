"""The training state and the train step: what one config needs to train on one mesh.

`train_step(state, batch, rng)` is one pure function, jitted once with the state donated
(`make_train_step`). The batch is sharded over all devices and the state replicated, so the model's
BatchNorm statistics are over the global batch (synchronised BatchNorm; see `sharding`). A step whose
loss or gradient is not finite leaves the state unchanged and records its number in
`state.nonfinite_step`; `check_finite` turns that into `NonFiniteLossError`.

Checkpoints hold `step`, `params`, `batch_stats`, `opt_state`, the train `rng` and the global batch
size (`checkpoint_tree`); `restore_state` reads them back onto any mesh (another number of devices
or processes), `initialise_from` takes only the model variables of another checkpoint (converted
weights, a backbone).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct, traverse_util
from jax.sharding import PartitionSpec as P

from deeplab_jax import caching, checkpoint, losses, models, optim, reductions, sharding
from deeplab_jax.errors import CheckpointError, NonFiniteLossError


@struct.dataclass
class TrainState:
  """Everything a train step changes. `nonfinite_step` is -1 until a step's loss is not finite."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array


def _init_program(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], dict]:
  """Compiled `rng -> {'params', 'batch_stats'}`, replicated over `mesh`."""
  x = jnp.zeros((1, models.factory.INIT_SIZE, models.factory.INIT_SIZE, 3), jnp.float32)

  def init(rng: jax.Array) -> dict[str, Any]:
    variables = model.init({'params': rng, 'dropout': rng}, x, train=False)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  lowered = jax.jit(init, out_shardings=sharding.replicated(mesh)).lower(
      jax.ShapeDtypeStruct((2,), jnp.uint32))
  if jax.default_backend() == 'cpu':
    # Initialisation runs once, and XLA:CPU spends most of its compile time optimising the
    # hundreds of truncated-normal initialisers: compile it without backend optimisation.
    return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})
  return lowered.compile()


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Step 0 with `variables` and a fresh optimizer state, replicated over `mesh`."""
  variables = sharding.replicate(dict(variables), mesh)
  opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(mesh))(variables['params'])
  return TrainState(step=sharding.replicate(np.int32(0), mesh), params=variables['params'],
                    batch_stats=variables['batch_stats'], opt_state=opt_state,
                    nonfinite_step=sharding.replicate(np.int32(-1), mesh))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               top_k_percent_pixels: float = 1.0, class_weights: tuple[float, ...] | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; returns the new state and scalar metrics (on device).

  `axis_name` None: `batch` is the global batch (jit over a sharded batch; XLA reduces over the
  devices). Otherwise the step runs inside `jax.shard_map` over that mesh axis on this device's
  rows, `model`'s BatchNorm reduces over the same axis, and every cross-device sum is added in
  device order (`reductions`): bit-identical steps on any process layout of the same devices.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = losses.segmentation_loss(logits, batch['label'], class_weights=class_weights,
                                    top_k_percent_pixels=top_k_percent_pixels,
                                    axis_name=axis_name)
    return loss, (logits, updated.get('batch_stats', state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:  # This device's share of the gradient: add the shares in order.
    grads = reductions.ordered_psum(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)

  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

  def keep(new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

  first_bad = (state.nonfinite_step < 0) & ~ok
  new_state = TrainState(
      step=state.step + ok.astype(jnp.int32),
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_step=jnp.where(first_bad, state.step + 1, state.nonfinite_step))
  step_metrics = {
      'train/loss': loss,
      'train/learning_rate': schedule(state.step),
      'train/grad_norm': grad_norm,
      'train/pixel_accuracy': losses.pixel_accuracy(logits, batch['label'],
                                                    axis_name=axis_name),
  }
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` bound to the config, jitted once: state donated and replicated, batch sharded.

  `config.train.ordered_reductions` runs it under `jax.shard_map` with fixed-order cross-device
  sums (see `train_step`); otherwise XLA partitions the global step itself.
  """
  weights = config.train.class_weights
  axis_name = sharding.DATA_AXIS if config.train.ordered_reductions else None
  step = functools.partial(
      train_step, model=model.clone(axis_name=axis_name), tx=tx,
      schedule=optim.learning_rate_schedule(config.optim, config.train.num_steps),
      top_k_percent_pixels=float(config.train.top_k_percent_pixels),
      class_weights=tuple(float(w) for w in weights) if weights is not None else None,
      axis_name=axis_name)
  if axis_name is not None:
    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(axis_name), P()),
                         out_specs=(P(), P()), check_vma=False)
  replicated = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated))


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What one config needs on one mesh: the model, the optimizer, the compiled initialisation
  (`init(rng)` -> variables) and the jitted train step."""

  model: nn.Module
  tx: optax.GradientTransformation
  init: Callable[[jax.Array], dict[str, Any]]
  train_step: Callable


@caching.keyed_cache(maxsize=4, key=lambda config, mesh: (caching.config_key(config), mesh))
def trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
  """The `Trainer` of `config` on `mesh`, built once per process: a rerun in the same process (a
  resumed run, a notebook) traces and compiles nothing again."""
  model = models.build_model(config.model)
  init = _init_program(model, mesh)
  tx = optim.create_optimizer(config, init.out_info['params'])
  return Trainer(model, tx, init, make_train_step(config, model, tx, mesh))


GLOBAL_BATCH_KEY = 'global_batch_size'


def checkpoint_tree(state: TrainState, rng: jax.Array, global_batch_size: int) -> dict[str, Any]:
  """What a training checkpoint holds (the non-finite marker is never saved). The global batch
  size is kept so that a resumed run can be checked to continue the same run."""
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'rng': rng,
          GLOBAL_BATCH_KEY: np.asarray(global_batch_size, np.int32)}


def restore_state(manager: Any, step: int, state: TrainState, rng: jax.Array,
                  mesh: jax.sharding.Mesh, global_batch_size: int) -> tuple[TrainState, jax.Array]:
  """(state, rng) of checkpoint `step`, in the structure and shardings of `state` and `rng` on
  `mesh`, which may have another number of devices and processes than the run that wrote it.

  CheckpointError when the checkpoint was trained with another global batch size (checkpoints
  from before the size was saved are not checked).
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      checkpoint_tree(state, rng, global_batch_size))
  tree = checkpoint.restore_tree(manager, step, abstract, optional=(GLOBAL_BATCH_KEY,))
  saved_batch = int(jax.device_get(tree.get(GLOBAL_BATCH_KEY, global_batch_size)))
  if saved_batch != global_batch_size:
    raise CheckpointError(
        f'Checkpoint {step} in {os.fspath(manager.directory)} continues a run with global batch {saved_batch}, but '
        f'config.train.batch_size={global_batch_size}: every step would see other images and the '
        f'run would not continue as it started. Keep config.train.batch_size={saved_batch} (the '
        'global batch stays the same when the number of devices or processes changes), or start '
        'a new --workdir.')
  restored = TrainState(step=tree['step'], params=tree['params'], batch_stats=tree['batch_stats'],
                        opt_state=tree['opt_state'], nonfinite_step=state.nonfinite_step)
  return restored, tree['rng']


def initialise_from(config: ml_collections.ConfigDict, state: TrainState, source: str,
                    mesh: jax.sharding.Mesh, step: int | None = None) -> TrainState:
  """Params and batch_stats from another checkpoint (`config.init_from`, a converted one, ...).

  The backbone must be in the checkpoint with matching shapes. Head modules missing from it (an
  ImageNet backbone checkpoint) keep their fresh initialisation, and `logits/*` is re-initialised
  when the checkpoint has a different number of classes. Any other mismatch is a CheckpointError
  naming the parameter.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  stored = checkpoint.stored_shapes(source, step)
  exclude = []
  logits_key = 'params/logits/semantic/weights'
  if logits_key in stored and stored[logits_key][-1] != config.model.num_classes:
    logging.info('init_from %s: %d classes in the checkpoint, %d in the model; logits/* are '
                 're-initialised.', source, stored[logits_key][-1], config.model.num_classes)
    exclude = ['params/logits/', 'batch_stats/logits/']
  scope = models.backbone_scope(config.model.backbone)
  head = [f'{c}/{name}/' for c in checkpoint.VARIABLE_COLLECTIONS
          for name in variables[c] if name != scope]
  restored, restored_step = checkpoint.restore_variables(
      source, step, template=variables, exclude=exclude, missing_ok=head)
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
  new = traverse_util.flatten_dict(restored, sep='/')
  fresh = sorted({k.split('/')[1] for k in flat if k not in new})
  if fresh:
    logging.info('init_from %s: not in the checkpoint, freshly initialised: %s', source, fresh)
  logging.info('Initialised %d of %d arrays from %s (step %d).', len(new), len(flat), source,
               restored_step)
  flat.update(new)
  merged = sharding.replicate(traverse_util.unflatten_dict(flat, sep='/'), mesh)
  return state.replace(params=merged['params'], batch_stats=merged.get('batch_stats', {}))


def check_finite(state: TrainState, manager: Any, workdir: str) -> None:
  """NonFiniteLossError when a step's loss or gradient was not finite (one device-to-host read)."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad < 0:
    return
  manager.wait_until_finished()
  last = manager.latest_step()
  where = (f'the last good checkpoint is step {last} in {checkpoint.checkpoint_dir(workdir)}'
           if last is not None else 'no checkpoint had been written yet')
  raise NonFiniteLossError(
      f'Non-finite loss or gradient at step {bad}; training stopped and that state was not '
      f'saved ({where}). Lower config.optim.base_lr, set config.optim.grad_clip_norm or '
      'config.optim.warmup_steps, or check the data (labels must be < num_classes or 255).')
