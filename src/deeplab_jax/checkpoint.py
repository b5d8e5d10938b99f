"""Checkpoints: orbax step directories under `WORKDIR/checkpoints`.

Every checkpoint is one orbax PyTree whose top level holds at least `params` and `batch_stats` (the
model variables, named as the official TF variables). Training checkpoints add `opt_state`, `step`,
`rng` and `nonfinite_step`; converted checkpoints (`save_variables`) hold only the model variables.
Evaluation, prediction and `config.init_from` read the model variables of either kind through
`restore_variables`, which restores partially and checks every shape against the model first (orbax
itself would silently return the on-disk shape). Paths may be URLs (`gs://bucket/workdir`): they are
kept as they are and listed through `etils.epath`; orbax reads and writes them itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint._src.metadata import array_metadata_store  # No public path in orbax 0.12.

from deeplab_jax import paths
from deeplab_jax.errors import CheckpointError

CHECKPOINT_SUBDIR = 'checkpoints'
VARIABLE_COLLECTIONS = ('params', 'batch_stats')
BEST_METRIC = 'miou'
# Replica-parallel saving cuts a replicated array into one slice per replica so that several hosts
# write it together; each slice is a program of its own to compile and run (5.6 s of the first save
# of the tiny model's training state on 4 devices, 0.8 s without). Slices below this size write
# faster whole, and within one process the same host writes every slice anyway.
MIN_REPLICA_SLICE_BYTES = 1 << 20

PyTree = Any


def checkpoint_dir(path: str | os.PathLike) -> str:
  """The orbax directory of `path`: a workdir (its `checkpoints/`) or a checkpoints dir itself."""
  path = paths.absolute(path)
  sub = paths.join(path, CHECKPOINT_SUBDIR)
  if paths.to_epath(sub).is_dir():
    return sub
  if paths.to_epath(path).is_dir() and _steps_in(path):
    return path
  return sub


def is_step_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is one finished step directory (`.../checkpoints/1000`)."""
  path = paths.absolute(path)
  name = paths.basename(path)
  return name.isdigit() and not _steps_in(path) and int(name) in _steps_in(paths.dirname(path))


def _resolve(path: str | os.PathLike, step: int | None) -> tuple[str, int | None]:
  """(orbax directory, step) of a workdir, a checkpoints dir or one step directory in it."""
  path = paths.absolute(path)
  name, parent = paths.basename(path), paths.dirname(path)
  if is_step_dir(path):
    if step is not None and int(step) != int(name):
      raise CheckpointError(f'{path!r} is the checkpoint of step {name}, but step {step} was asked '
                            'for; pass the checkpoints directory instead.')
    return parent, int(name)
  return checkpoint_dir(path), step


def _steps_in(directory: str) -> list[int]:
  """Finished step directories: never a checkpoint whose write was cut short (kill -9, preemption).

  On a local file system orbax writes `<step>.orbax-checkpoint-tmp-<n>` and renames it to `<step>` as
  its last act; where renames are not atomic (e.g. GCS) it writes `<step>` and marks it finished with
  `commit_success.txt`. `is_path_finalized` knows both.
  """
  if not paths.to_epath(directory).is_dir():
    return []
  steps = []
  for child in paths.to_epath(directory).iterdir():
    step_dir = paths.join(directory, child.name)
    if child.name.isdigit() and child.is_dir() and ocp.path.step.is_path_finalized(step_dir):
      steps.append(int(child.name))
  return sorted(steps)


def available_steps(path: str | os.PathLike) -> list[int]:
  """Steps of the finished checkpoints of workdir / checkpoints dir `path`, ascending."""
  return _steps_in(checkpoint_dir(path))


def latest_step(path: str | os.PathLike) -> int | None:
  """The newest checkpoint step in `path`, or None when there is none."""
  steps = available_steps(path)
  return steps[-1] if steps else None


def create_manager(path: str | os.PathLike, *, keep: int = 3, keep_best: bool = True,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager keeping the latest `keep` checkpoints plus the one with the best `miou`.

  Both a `BestN` preservation policy and `best_fn` are needed: without `best_fn` orbax writes no
  metrics and `best_step()` quietly returns the latest step. Checkpoints saved without metrics are
  governed by `LatestN` only.
  """
  policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
  best_fn = None
  if keep_best:
    best_fn = _best_metric
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=_best_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, best_fn=best_fn, best_mode='max',
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(path), options=options,
                               item_handlers=_saving_handler())


def _saving_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's PyTree handler, its arrays written replica-parallel only across processes and only
  in slices of at least `MIN_REPLICA_SLICE_BYTES` (orbax: every array, in one slice per replica)."""
  th = ocp.type_handlers
  arrays = th.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                           min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                           array_metadata_store=array_metadata_store.Store())
  registry = th.create_type_handler_registry(
      *[(t, th.ScalarHandler()) for t in (int, float, bytes, np.number)],
      (np.ndarray, th.NumpyHandler()), (jax.Array, arrays), (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=ocp.PyTreeCheckpointHandler())


def _best_metric(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


def save_tree(manager: ocp.CheckpointManager, step: int, tree: PyTree,
              metrics: Mapping[str, float] | None = None) -> None:
  """Save `tree` (asynchronously when the manager is async) as checkpoint `step`."""
  manager.save(int(step), args=ocp.args.PyTreeSave(tree),
               metrics=dict(metrics) if metrics is not None else None, force=True)


def restore_tree(manager: ocp.CheckpointManager, step: int, abstract_tree: Mapping[str, PyTree], *,
                 optional: Iterable[str] = ()) -> dict[str, PyTree]:
  """Restore checkpoint `step` into the structure, shapes and shardings of `abstract_tree`.

  `abstract_tree` maps names to `jax.ShapeDtypeStruct`s (with shardings) or arrays. Shapes are
  checked first. Top-level entries named in `optional` may be absent from the checkpoint (one
  written before they existed); they are then absent from the result.
  """
  manager.wait_until_finished()
  directory = os.fspath(manager.directory)
  stored = _stored_shapes(manager, step)
  abstract_tree = {k: v for k, v in abstract_tree.items()
                   if k not in optional or any(n == k or n.startswith(f'{k}/') for n in stored)}
  _check_shapes(stored, _flatten(abstract_tree), f'{directory}/{step}')
  return manager.restore(int(step), args=ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree)))


def save_variables(workdir: str | os.PathLike, variables: Mapping[str, PyTree], step: int) -> str:
  """Write model variables `{'params', 'batch_stats'}` as checkpoint `step` of `workdir`.

  This is what converters use: eval, predict and `config.init_from=workdir` read the result.
  Returns the step directory.
  """
  missing = [c for c in VARIABLE_COLLECTIONS if c not in variables]
  if missing:
    raise ValueError(f'save_variables needs collections {VARIABLE_COLLECTIONS}; missing {missing}.')
  tree = {c: jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables[c]))
          for c in VARIABLE_COLLECTIONS}
  manager = create_manager(workdir, keep=1_000_000, keep_best=False, async_save=False)
  try:
    save_tree(manager, step, tree)
    manager.wait_until_finished()
  finally:
    manager.close()
  return paths.join(checkpoint_dir(workdir), str(int(step)))


def restore_variables(workdir: str | os.PathLike, step: int | None = None,
                      template: Mapping[str, PyTree] | None = None, *,
                      exclude: Iterable[str] = (),
                      missing_ok: Iterable[str] = ()) -> tuple[dict[str, PyTree], int]:
  """Model variables `{'params', 'batch_stats'}` (numpy) of checkpoint `step` (None: latest).

  `workdir` is a workdir, a checkpoints directory or one step directory in it. With `template` (variables or their
  `jax.eval_shape`), every template leaf must exist in the checkpoint with the same shape; extra
  checkpoint entries are ignored. Paths starting with an `exclude` prefix (e.g. 'params/logits/') are
  not read; template paths starting with a `missing_ok` prefix may be absent from the checkpoint.
  Either kind is absent from the result. Returns (variables, step).
  """
  directory, step = _resolve(workdir, step)
  steps = _steps_in(directory)
  if not steps:
    raise CheckpointError(
        f'No checkpoint found in {os.fspath(workdir)!r} (looked for step directories in '
        f'{directory!r}). Train first (--mode=train), convert official weights with '
        'deeplab_jax.convert, or point --workdir / config.init_from at a directory holding one.')
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise CheckpointError(f'Checkpoint step {step} is not in {directory!r}; available steps: '
                          f'{steps}. Set config.eval.checkpoint_step to one of them or to None.')
  step = int(step)
  exclude, missing_ok = tuple(exclude), tuple(missing_ok)
  manager = _read_only_manager(directory)
  try:
    stored = _stored_shapes(manager, step)
    where = f'{directory}/{step}'
    for c in VARIABLE_COLLECTIONS:
      if not any(k.startswith(c + '/') for k in stored):
        if c == 'batch_stats' and template is not None and not _flatten(template.get(c, {})):
          continue
        raise CheckpointError(f'Checkpoint {where} has no {c!r} collection; it is not a '
                              'deeplab_jax checkpoint (save converted weights with '
                              'deeplab_jax.checkpoint.save_variables).')
    if template is not None:
      wanted = {c: template.get(c, {}) for c in VARIABLE_COLLECTIONS}
      wanted_flat = {k: v for k, v in _flatten(wanted).items()
                     if not k.startswith(exclude) and (k in stored or not k.startswith(missing_ok))}
      _check_shapes(stored, wanted_flat, where)
      shapes = {k: (tuple(np.shape(v)), np.float32) for k, v in wanted_flat.items()}
    else:
      shapes = {k: (v[0], v[1]) for k, v in stored.items()
                if k.split('/')[0] in VARIABLE_COLLECTIONS and not k.startswith(exclude)}
    item = _unflatten({k: np.zeros(s, d) for k, (s, d) in shapes.items()})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  finally:
    manager.close()
  variables = {c: restored.get(c, {}) for c in VARIABLE_COLLECTIONS}
  variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
  return variables, step


def stored_shapes(workdir: str | os.PathLike, step: int | None = None) -> dict[str, tuple]:
  """{'params/a/b/weights': shape} of every array in checkpoint `step` (None: latest)."""
  directory, step = _resolve(workdir, step)
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise CheckpointError(f'No checkpoint found in {directory!r}.')
  manager = _read_only_manager(directory)
  try:
    return {k: v[0] for k, v in _stored_shapes(manager, step).items()}
  finally:
    manager.close()


def _stored_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[tuple, Any]]:
  """{'a/b/c': (shape, dtype)} from the checkpoint's metadata (nothing is read but the metadata)."""
  metadata = manager.item_metadata(int(step))
  tree = getattr(metadata, 'tree', metadata)
  flat = traverse_util.flatten_dict(_to_dict(tree), sep='/')
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()
          if hasattr(v, 'shape')}


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, 'shape'):
    return {str(i): _to_dict(v) for i, v in enumerate(tree)}
  return tree


def _flatten(tree: PyTree) -> dict[str, Any]:
  """{'a/b/c': leaf} for nested mappings, with leaves of any pytree kind keyed by their key path."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _check_shapes(stored: Mapping[str, tuple[tuple, Any]], wanted_flat: Mapping[str, Any],
                  where: str) -> None:
  """Raise CheckpointError naming the first model entry missing from, or misshaped in, `stored`."""
  order = sorted(wanted_flat, key=lambda k: (not k.startswith('params/'), k))  # params first
  missing = [k for k in order if k not in stored]
  mismatched = [(k, stored[k][0], tuple(np.shape(wanted_flat[k]))) for k in order
                if k in stored and stored[k][0] != tuple(np.shape(wanted_flat[k]))]
  if mismatched:
    path, got, want = mismatched[0]
    more = f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''
    raise CheckpointError(
        f'Checkpoint {where} does not fit the model: {path} has shape {got} in the checkpoint but '
        f'{want} in the model{more}. Fix: make config.model match the checkpoint (backbone, '
        'width_multiplier, num_classes, aspp/decoder channels, separable convs); a different '
        'num_classes is only re-initialised automatically for config.init_from.')
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise CheckpointError(
        f'Checkpoint {where} does not fit the model: {missing[0]} is missing from the '
        f'checkpoint{more}. Fix: make config.model match the checkpoint (backbone, decoder, '
        'image_pooling, aspp/decoder settings).')
