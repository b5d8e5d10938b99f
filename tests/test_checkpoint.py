"""Checkpoint API: converter-style save/restore, clear errors, init_from, latest + best retention."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from fakes import random_variables, tiny_config
from flax import traverse_util

from deeplab_jax import checkpoint, sharding, train_state


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def test_save_and_restore_variables_roundtrip(tmp_path):
  config = tiny_config()
  variables = random_variables(config)
  path = checkpoint.save_variables(tmp_path, variables, step=7)
  assert path.endswith('checkpoints/7')
  template = random_variables(config, seed=1)
  for source in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '7'):
    restored, step = checkpoint.restore_variables(source, template=template)
    assert step == 7
    a, b = _flat(variables), _flat(restored)
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Without a template everything is read as stored.
  restored, _ = checkpoint.restore_variables(tmp_path)
  assert set(_flat(restored)) == set(_flat(variables))


def test_restore_errors_are_clear(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='No checkpoint found'):
    checkpoint.restore_variables(tmp_path / 'empty')
  config = tiny_config()
  checkpoint.save_variables(tmp_path, random_variables(config), step=1)
  with pytest.raises(checkpoint.CheckpointError, match=r'step 5 is not in .*available steps: \[1\]'):
    checkpoint.restore_variables(tmp_path, step=5)
  wider = tiny_config()
  wider.model.aspp_channels = 32
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'params/aspp0/BatchNorm/beta has shape \(16,\) in the checkpoint but '
                           r'\(32,\) in the model \(and \d+ more\)\. Fix: make config.model match'):
    checkpoint.restore_variables(tmp_path, template=random_variables(wider))
  # A model with a module that the checkpoint lacks: the error names it.
  no_decoder = tiny_config()
  no_decoder.model.decoder = False
  checkpoint.save_variables(tmp_path / 'v3', random_variables(no_decoder), step=1)
  with pytest.raises(checkpoint.CheckpointError, match=r'params/decoder/\S+ is missing'):
    checkpoint.restore_variables(tmp_path / 'v3', template=random_variables(config))


def test_shape_error_names_parameter_and_both_shapes(tmp_path):
  config = tiny_config()
  checkpoint.save_variables(tmp_path, random_variables(config), step=2)
  more_classes = tiny_config()
  more_classes.model.num_classes = 5
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'params/logits/semantic/biases has shape \(3,\) in the checkpoint but '
                           r'\(5,\) in the model'):
    checkpoint.restore_variables(tmp_path, template=random_variables(more_classes))


def test_init_from_reinitialises_logits_and_keeps_the_rest(tmp_path):
  source = tiny_config()
  source_vars = random_variables(source, seed=3)
  checkpoint.save_variables(tmp_path / 'converted', source_vars, step=30000)
  target = tiny_config()
  target.model.num_classes = 5
  fresh = random_variables(target, seed=4)
  mesh = sharding.create_mesh(jax.devices()[:1])
  state = train_state.TrainState(step=np.int32(0), params=fresh['params'],
                           batch_stats=fresh['batch_stats'], opt_state=(),
                           nonfinite_step=np.int32(-1))
  state = train_state.initialise_from(target, state, str(tmp_path / 'converted'), mesh)
  got = _flat(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
  src, new = _flat(source_vars), _flat(fresh)
  for k, v in got.items():
    if k.startswith('params/logits/'):
      np.testing.assert_array_equal(v, new[k], err_msg=k)  # Re-initialised (5 classes).
    else:
      np.testing.assert_array_equal(v, src[k], err_msg=k)  # From the checkpoint.
  # A backbone-only checkpoint (ImageNet) initialises the backbone; the head stays fresh.
  backbone_only = {c: {k: v for k, v in source_vars[c].items() if k.startswith('resnet')}
                   for c in ('params', 'batch_stats')}
  checkpoint.save_variables(tmp_path / 'imagenet', backbone_only, step=0)
  state = train_state.initialise_from(target, state.replace(params=fresh['params'],
                                                      batch_stats=fresh['batch_stats']),
                                str(tmp_path / 'imagenet'), mesh)
  got = _flat(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
  for k, v in got.items():
    expected = src[k] if k.split('/')[1].startswith('resnet') else new[k]
    np.testing.assert_array_equal(v, expected, err_msg=k)
  # A backbone that does not fit is an error naming the parameter.
  other = tiny_config()
  other.model.width_multiplier = 0.125
  wide = random_variables(other)
  state = train_state.TrainState(step=np.int32(0), params=wide['params'],
                           batch_stats=wide['batch_stats'], opt_state=(),
                           nonfinite_step=np.int32(-1))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'params/\S+ has shape \(1, 1, 128, 16\) in the checkpoint but '
                           r'\(1, 1, 256, 16\) in the model'):
    train_state.initialise_from(other, state, str(tmp_path / 'converted'), mesh)


def test_manager_keeps_latest_and_best(tmp_path):
  manager = checkpoint.create_manager(tmp_path, keep=2)
  tree = {'params': {'w': np.ones(3, np.float32)}, 'batch_stats': {'m': np.zeros(3, np.float32)}}
  checkpoint.save_tree(manager, 1, tree)
  checkpoint.save_tree(manager, 2, tree, {'miou': 0.7})
  checkpoint.save_tree(manager, 3, tree, {'miou': 0.5})
  checkpoint.save_tree(manager, 4, tree)
  checkpoint.save_tree(manager, 5, tree, {'miou': 0.6})
  manager.wait_until_finished()
  assert manager.best_step() == 2
  manager.close()
  assert checkpoint.available_steps(tmp_path) == [2, 4, 5]  # Latest 2 plus the best.
  assert checkpoint.latest_step(tmp_path) == 5
