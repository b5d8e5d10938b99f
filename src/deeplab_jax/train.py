"""Training: the train-and-evaluate loop around `train_state.train_step`.

A rerun with the same workdir resumes from the latest checkpoint: step, params, optimizer state,
BatchNorm statistics and rng; the input pipeline restarts at that step, so the continued run matches
an uninterrupted one. SIGTERM (preemption) or SIGINT ends the run after the current step with a
checkpoint that is durable on return (see `preemption`). The config is checked before anything is
compiled (see `validate`). The loop reads the device only at log, evaluation and checkpoint steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from deeplab_jax import (
    checkpoint,
    distributed,
    evaluate,
    input_pipeline,
    metrics,
    models,
    paths,
    preemption,
    sharding,
    train_state,
    validate,
)
from deeplab_jax.config import apply_smoke
from deeplab_jax.errors import CheckpointError

TrainIteratorFn = Callable[..., Iterator[Mapping[str, np.ndarray]]]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       run_eval: bool = True, stop_at_step: int | None = None,
                       create_train_iterator: TrainIteratorFn | None = None,
                       create_eval_iterator: evaluate.EvalIteratorFn | None = None
                       ) -> train_state.TrainState:
  """Train `config` in `workdir` (resuming from its latest checkpoint), evaluating every
  `config.eval.every` steps and at the end when `run_eval`.

  Args:
    config: a full config (`deeplab_jax.config`); `config.smoke=True` shrinks it first.
    workdir: local directory or URL for checkpoints, metrics and eval results.
    run_eval: evaluate during and at the end of training.
    stop_at_step: end this run early at that step (with a checkpoint), as a preempted job would;
      the schedule still spans `config.train.num_steps`.
    create_train_iterator, create_eval_iterator: data factories with the contracts of
      `input_pipeline.create_train_iterator` / `create_eval_iterator` (their defaults).

  Returns:
    The final `train_state.TrainState`.
  """
  config = apply_smoke(config)
  validate.validate_config(config, mode='train_and_eval' if run_eval else 'train')
  class_names = validate.dataset_spec(config).class_names
  workdir = os.fspath(workdir)
  paths.makedirs(workdir)  # A local directory or a URL (gs://: shared by all hosts of a pod).
  mesh = sharding.create_mesh()
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
           stop: preemption.StopSignals) -> train_state.TrainState:
  """The body of `train_and_evaluate`: set up or restore the state, then the step loop.

  `stop.should_stop(step)` is asked after every step (a host-side flag; `preemption` explains how
  processes agree). When it says so, that step is checkpointed, without an evaluation, and the loop
  returns once the checkpoint is durable.
  """
  t = config.train
  trainer = train_state.trainer(config, mesh)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(t.seed))
  state = train_state.create_train_state(trainer.init(init_rng), trainer.tx, mesh)
  train_rng = jax.device_put(train_rng, sharding.replicated(mesh))
  steps = checkpoint.available_steps(workdir)
  resumable = [s for s in steps if any(k.startswith('opt_state/')
                                       for k in checkpoint.stored_shapes(workdir, s))]
  if steps:  # Where the checkpoint came from and the fix, for a checkpoint of another model.
    source = (f'--workdir={workdir}', 'Or start this model in a new --workdir.')
  else:
    source = (f'config.init_from={config.init_from!r}',
              'Or point config.init_from at a checkpoint of this model (or of its backbone).')
  try:
    if resumable:
      logging.info('Resuming from checkpoint step %d in %s.', resumable[-1], workdir)
      state, train_rng = train_state.restore_state(manager, resumable[-1], state, train_rng, mesh,
                                                   t.batch_size)
    elif steps:  # Variables only (e.g. converted weights saved into the workdir): start from them.
      state = train_state.initialise_from(config, state, workdir, mesh, steps[-1])
    elif config.init_from:
      state = train_state.initialise_from(config, state, config.init_from, mesh)
  except CheckpointError as e:
    raise CheckpointError(f'{source[0]}: {e} {source[1]}') from None
  start_step = int(jax.device_get(state.step))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info('Model %s: %d parameters; training steps %d..%d on %d devices.',
               config.model.backbone, num_params, start_step, t.num_steps, mesh.devices.size)
  if jax.process_index() == 0 and start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  step_fn = trainer.train_step
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
      if step == start_step + 1:
        step_fn = distributed.compile_together(step_fn, state, batch, train_rng,
                                               name='deeplab_jax/train_step')
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
      train_state.check_finite(state, manager, workdir)
    elif do_save:
      train_state.check_finite(state, manager, workdir)
    report(step)
    eval_metrics = None
    if do_eval:
      with report.timed('eval'):
        result = evaluator({'params': state.params, 'batch_stats': state.batch_stats}, step,
                           writer, workdir)
      eval_metrics = {checkpoint.BEST_METRIC: result['miou']}
    if do_save:
      with report.timed('checkpoint'):
        checkpoint.save_tree(manager, step,
                             train_state.checkpoint_tree(state, train_rng, t.batch_size),
                             eval_metrics)
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
