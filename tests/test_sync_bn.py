"""Synchronised BatchNorm: a train step data-parallel over 4 devices equals the same step on 1."""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util
from test_train import fake_train_iterator, random_variables, tiny_config

from deeplab_jax import models, optim, sharding, train


def _one_step(config, devices, variables, batch):
  """The jitted train step on a mesh over `devices`; returns the new state and metrics on host."""
  mesh = sharding.create_mesh(devices)
  model = models.build_model(config.model)
  with jax.set_mesh(mesh):
    tx = optim.create_optimizer(config, variables['params'])
    state = train.create_train_state(variables, tx, mesh)
    step = train.make_train_step(config, model, tx, mesh)
    new_state, step_metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(3))
    return jax.device_get((new_state, step_metrics))


def test_four_devices_equal_one_device():
  assert jax.device_count() == 4  # conftest forces 4 CPU devices.
  config = tiny_config()
  variables = random_variables(config)
  batch = next(fake_train_iterator(config, mean_pixel=None))
  four, metrics4 = _one_step(config, jax.devices(), variables, batch)
  one, metrics1 = _one_step(config, jax.devices()[:1], variables, batch)
  assert metrics4.keys() == metrics1.keys()
  for k in metrics4:
    np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=1e-5, err_msg=k)
  # Updated params, BN statistics and momentum (= the gradients after one step) agree.
  for name in ('params', 'batch_stats', 'opt_state'):
    leaves4 = jax.tree_util.tree_flatten_with_path(getattr(four, name))[0]
    leaves1 = jax.tree.leaves(getattr(one, name))
    assert len(leaves4) == len(leaves1)
    for (path, x), y in zip(leaves4, leaves1, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')
  # The statistics moved from their initial values: these were real batch-statistics updates,
  # over the global batch (a per-device mean over 1 image each would differ).
  old = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  new = traverse_util.flatten_dict(four.batch_stats, sep='/')
  assert all(not np.allclose(old[k], new[k]) for k in old)
