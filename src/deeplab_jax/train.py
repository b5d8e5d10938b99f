"""Training: the data-parallel train step and the train-and-evaluate loop.

`train_step(state, batch, rng)` is one pure function, jitted once with the state donated. The batch
is sharded over all devices and the state replicated, so the model's BatchNorm statistics are over the
global batch (synchronised BatchNorm; see `sharding`). A step whose loss or gradient is not finite
leaves the state unchanged and records its number in `state.nonfinite_step`; the loop checks it at
log, evaluation and checkpoint steps (the only host-device syncs) and stops with an error, the last
good checkpoint kept and the bad state never saved.

A rerun with the same workdir resumes from the latest checkpoint: step, params, optimizer state,
BatchNorm statistics and rng; the input pipeline restarts at that step, so the continued run matches
an uninterrupted one. SIGTERM (preemption) or SIGINT ends the run after the current step with a
checkpoint that is durable on return (see `preemption`). The config is checked before anything is
compiled (see `validate`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import struct, traverse_util

from deeplab_jax import (
    checkpoint,
    evaluate,
    input_pipeline,
    losses,
    metrics,
    models,
    optim,
    paths,
    preemption,
    sharding,
    validate,
)

TrainIteratorFn = Callable[..., Iterator[Mapping[str, np.ndarray]]]


@struct.dataclass
class TrainState:
  """Everything a train step changes. `nonfinite_step` is -1 until a step's loss is not finite."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With `config.smoke=True`, a copy shrunk for a quick local run (tiny width, few steps, small
  crop); otherwise `config` unchanged. Applying it twice changes nothing more."""
  if not config.get('smoke', False):
    return config
  c = config.copy_and_resolve_references()
  n = jax.device_count()
  m = c.model
  m.width_multiplier = min(m.width_multiplier, 0.0625)
  m.aspp_channels = min(m.aspp_channels, 16)
  m.decoder_channels = min(m.decoder_channels, 16)
  m.low_level_channels = min(m.low_level_channels, 8)
  m.bn_decay = min(m.get('bn_decay') or 0.9, 0.9)  # Moving averages that settle in 20 steps.
  c.train.num_steps = min(c.train.num_steps, 20)
  c.train.batch_size = 2 * n
  c.train.crop_size = (65, 65)
  if m.get('atrous_rates') is not None:  # Rates a config sets must fit the smaller feature maps.
    feature = -(-c.train.crop_size[0] // m.output_stride)
    m.atrous_rates = tuple(max(1, min(int(r), feature - 1)) for r in m.atrous_rates)
  c.train.log_every = min(c.train.log_every, 5)
  c.train.checkpoint_every = min(c.train.checkpoint_every, 10)
  c.eval.crop_size = (65, 65)
  c.eval.batch_size = 2 * n
  c.eval.every = min(c.eval.every, c.train.num_steps)
  c.eval.num_images = min(c.eval.num_images or 8, 8)
  return c


INIT_SIZE = 65  # Parameter shapes do not depend on the input size: initialise on a small one.


def _init_program(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], dict]:
  """Compiled `rng -> {'params', 'batch_stats'}`, replicated over `mesh`."""
  x = jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32)

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


def init_variables(model: nn.Module, rng: jax.Array, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Fresh `{'params', 'batch_stats'}` from a raw `jax.random.PRNGKey`, replicated over `mesh`."""
  return _init_program(model, mesh)(rng)


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
               top_k_percent_pixels: float = 1.0,
               class_weights: tuple[float, ...] | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; returns the new state and scalar metrics (on device)."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = losses.segmentation_loss(logits, batch['label'], class_weights=class_weights,
                                    top_k_percent_pixels=top_k_percent_pixels)
    return loss, (logits, updated.get('batch_stats', state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)

  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
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
      'train/pixel_accuracy': losses.pixel_accuracy(logits, batch['label']),
  }
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` bound to the config, jitted once: state donated and replicated, batch sharded."""
  weights = config.train.get('class_weights')
  step = functools.partial(
      train_step, model=model, tx=tx,
      schedule=optim.learning_rate_schedule(config.optim, config.train.num_steps),
      top_k_percent_pixels=float(config.train.top_k_percent_pixels),
      class_weights=tuple(float(w) for w in weights) if weights is not None else None)
  replicated = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated))


@dataclasses.dataclass(frozen=True)
class Programs:
  """What one config needs on one mesh: the model, the optimizer and their compiled functions."""

  model: nn.Module
  tx: optax.GradientTransformation
  init: Callable[[jax.Array], dict[str, Any]]
  train_step: Callable


_PROGRAMS: dict[tuple[str, jax.sharding.Mesh], Programs] = {}
_MAX_PROGRAMS = 4


def programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Programs:
  """`Programs` of `config` on `mesh`, built once per process: a rerun in the same process (a
  resumed run, a notebook) traces and compiles nothing again."""
  key = (config.to_json_best_effort(sort_keys=True), mesh)
  if key not in _PROGRAMS:
    model = models.build_model(config.model)
    init = _init_program(model, mesh)
    tx = optim.create_optimizer(config, init.out_info['params'])
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = Programs(model, tx, init, make_train_step(config, model, tx, mesh))
  return _PROGRAMS[key]


def _checkpoint_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'rng': rng}


def _restore_state(manager, step: int, state: TrainState, rng: jax.Array,
                   mesh: jax.sharding.Mesh) -> tuple[TrainState, jax.Array]:
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      _checkpoint_tree(state, rng))
  tree = checkpoint.restore_tree(manager, step, abstract)
  restored = TrainState(step=tree['step'], params=tree['params'], batch_stats=tree['batch_stats'],
                        opt_state=tree['opt_state'], nonfinite_step=state.nonfinite_step)
  return restored, tree['rng']


def initialise_from(config: ml_collections.ConfigDict, state: TrainState, source: str,
                    mesh: jax.sharding.Mesh, step: int | None = None) -> TrainState:
  """Params and batch_stats from another checkpoint (`config.init_from`, a converted one, ...).

  The backbone must be in the checkpoint with matching shapes. Head modules missing from it (an
  ImageNet backbone checkpoint) keep their fresh initialisation, and `logits/*` is re-initialised
  when the checkpoint has a different number of classes. Any other mismatch is an error naming the
  parameter.
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
  merged = traverse_util.unflatten_dict(flat, sep='/')
  merged = sharding.replicate(merged, mesh)
  return state.replace(params=merged['params'], batch_stats=merged.get('batch_stats', {}))


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


def _check_finite(state: TrainState, manager, workdir: str) -> None:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       run_eval: bool = True, stop_at_step: int | None = None,
                       create_train_iterator: TrainIteratorFn | None = None,
                       create_eval_iterator: evaluate.EvalIteratorFn | None = None) -> TrainState:
  """Train `config` in `workdir` (resuming from its latest checkpoint), evaluating every
  `config.eval.every` steps and at the end when `run_eval`.

  `stop_at_step` ends this run early at that step (with a checkpoint), as a preempted job would; the
  schedule still spans `config.train.num_steps`. The iterator factories default to
  `deeplab_jax.input_pipeline`'s. Returns the final state.
  """
  config = apply_smoke(config)
  validate.validate_config(config, mode='train_and_eval' if run_eval else 'train')
  workdir = os.fspath(workdir)
  paths.makedirs(workdir)  # A local directory or a URL (gs://: shared by all hosts of a pod).
  class_names = evaluate.dataset_class_names(config)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  writer = metrics.create_writer(workdir)
  manager = checkpoint.create_manager(workdir, keep=config.train.keep_checkpoints)
  try:
    with jax.set_mesh(mesh), preemption.StopSignals(sync_every=config.train.log_every) as stop:
      return _train(config, workdir, mesh, writer, manager, class_names, run_eval, stop_at_step,
                    create_train_iterator or input_pipeline.create_train_iterator,
                    create_eval_iterator, stop)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           writer: metric_writers.MetricWriter, manager: Any, class_names: tuple[str, ...],
           run_eval: bool, stop_at_step: int | None, create_train_iterator: TrainIteratorFn,
           create_eval_iterator: evaluate.EvalIteratorFn | None,
           stop: preemption.StopSignals) -> TrainState:
  """The body of `train_and_evaluate`: set up or restore the state, then the step loop.

  `stop.should_stop(step)` is asked after every step (a host-side flag; `preemption` explains how
  processes agree). When it says so, that step is checkpointed, without an evaluation, and the loop
  returns once the checkpoint is durable.
  """
  t = config.train
  compiled = programs(config, mesh)
  tx = compiled.tx
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(t.seed))
  state = create_train_state(compiled.init(init_rng), tx, mesh)
  train_rng = jax.device_put(train_rng, sharding.replicated(mesh))
  steps = checkpoint.available_steps(workdir)
  resumable = [s for s in steps if any(k.startswith('opt_state/')
                                       for k in checkpoint.stored_shapes(workdir, s))]
  if steps:  # Where the checkpoint came from and the fix, for a checkpoint of another model.
    source = (f'--workdir={workdir}', 'Or start this model in a new --workdir.')
  else:
    source = (f'config.init_from={config.get("init_from")!r}',
              'Or point config.init_from at a checkpoint of this model (or of its backbone).')
  try:
    if resumable:
      logging.info('Resuming from checkpoint step %d in %s.', resumable[-1], workdir)
      state, train_rng = _restore_state(manager, resumable[-1], state, train_rng, mesh)
    elif steps:  # Variables only (e.g. converted weights saved into the workdir): start from them.
      state = initialise_from(config, state, workdir, mesh, steps[-1])
    elif config.get('init_from'):
      state = initialise_from(config, state, config.init_from, mesh)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(f'{source[0]}: {e} {source[1]}') from None
  start_step = int(jax.device_get(state.step))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info('Model %s: %d parameters; training steps %d..%d on %d devices.',
               config.model.backbone, num_params, start_step, t.num_steps, mesh.devices.size)
  if jax.process_index() == 0 and start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  step_fn = compiled.train_step
  evaluator = (evaluate.Evaluator(config, mesh, class_names, create_eval_iterator)
               if run_eval else None)
  train_iter = create_train_iterator(
      config, mean_pixel=models.mean_pixel(config.model.backbone),
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=start_step)
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer,
                                           every_steps=t.log_every, every_secs=None)
  last_step = t.num_steps if stop_at_step is None else min(stop_at_step, t.num_steps)
  local_batch = sharding.local_batch_size(t.batch_size)
  pending: list[dict[str, jax.Array]] = []
  for step in range(start_step + 1, last_step + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = next(train_iter)
      if batch['image'].shape[0] != local_batch:
        raise ValueError(f'The train iterator yields {batch["image"].shape[0]} rows per '
                         f'process; config.train.batch_size={t.batch_size} needs {local_batch}.')
      batch = sharding.global_batch({'image': batch['image'], 'label': batch['label']}, mesh)
      state, step_metrics = step_fn(state, batch, train_rng)
    pending.append(step_metrics)
    stopping = stop.should_stop(step)
    is_last = step == last_step or stopping
    do_eval = evaluator is not None and not stopping and (
        step % config.eval.every == 0 or step == t.num_steps)
    do_save = step % t.checkpoint_every == 0 or is_last or do_eval
    if step % t.log_every == 0 or is_last:
      _write_train_metrics(writer, step, pending)  # Waits for the step: a true steps/s below.
      pending = []
      _check_finite(state, manager, workdir)
    elif do_save:
      _check_finite(state, manager, workdir)
    report(step)
    eval_metrics = None
    if do_eval:
      with report.timed('eval'):
        result = evaluator({'params': state.params, 'batch_stats': state.batch_stats}, step,
                           writer, workdir)
      eval_metrics = {checkpoint.BEST_METRIC: result['miou']}
    if do_save:
      with report.timed('checkpoint'):
        checkpoint.save_tree(manager, step, _checkpoint_tree(state, train_rng), eval_metrics)
    if stopping:
      manager.wait_until_finished()
      logging.info('Stopped by %s after step %d: checkpoint %d is saved in %s; rerun the same '
                   'command to resume.', stop.received, step, step,
                   checkpoint.checkpoint_dir(workdir))
      return state
  if evaluator is not None and start_step >= last_step == t.num_steps:
    # Rerun of a finished job: evaluate its final checkpoint again instead of doing nothing.
    evaluator({'params': state.params, 'batch_stats': state.batch_stats}, start_step, writer,
              workdir)
  return state


def _write_train_metrics(writer: metric_writers.MetricWriter, step: int,
                         pending: list[dict[str, jax.Array]]) -> None:
  """Mean of the steps since the last write (one device-to-host transfer)."""
  if not pending:
    return
  values = jax.device_get(pending)
  scalars = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
  writer.write_scalars(step, scalars)
  logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
