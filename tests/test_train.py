"""Training: losses, optimizer masks, sync BN over devices, the main loop end to end, resume."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakes import (
  FAKE_CLASSES,
  fake_eval_iterator,
  fake_train_iterator,
  random_variables,
  tiny_config,
)
from flax import traverse_util
from PIL import Image

from deeplab_jax import (
  checkpoint,
  evaluate,
  losses,
  metrics,
  models,
  optim,
  train,
)
from deeplab_jax import config as config_lib

# --------------------------------------------------------------------------------------- losses


def _reference_loss(logits, labels, weights=None, top_k=1.0):
  logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  labels = np.asarray(labels).reshape(-1)
  valid = labels != 255
  safe = np.where(valid, labels, 0)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  pixel = -logp[np.arange(len(safe)), safe] * valid
  if weights is not None:
    pixel = pixel * np.asarray(weights)[safe]
  if top_k >= 1.0:
    return pixel.sum() / valid.sum()
  k = int(top_k * len(pixel))
  top = np.sort(pixel)[::-1][:k]
  return top.sum() / np.count_nonzero(top)


def test_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 5, 7))
  labels[rng.random(labels.shape) < 0.3] = 255
  plain = losses.segmentation_loss(logits, labels)
  np.testing.assert_allclose(plain, _reference_loss(logits, labels), rtol=1e-5)
  # Ignored pixels do not matter, whatever their logits.
  changed = np.where((labels == 255)[..., None], 100.0, logits)
  np.testing.assert_allclose(losses.segmentation_loss(changed, labels), plain, rtol=1e-6)
  weights = (1.0, 2.0, 0.5, 3.0)
  np.testing.assert_allclose(losses.segmentation_loss(logits, labels, class_weights=weights),
                             _reference_loss(logits, labels, weights), rtol=1e-5)
  for top_k in (0.25, 0.5):
    mined = losses.segmentation_loss(logits, labels, top_k_percent_pixels=top_k)
    np.testing.assert_allclose(mined, _reference_loss(logits, labels, top_k=top_k), rtol=1e-5)
    assert mined > plain  # The hardest pixels have higher loss than the average.
  with pytest.raises(ValueError, match='class_weights'):
    losses.segmentation_loss(logits, labels, class_weights=(1.0, 2.0))
  all_ignored = np.full_like(labels, 255)
  assert float(losses.segmentation_loss(logits, all_ignored)) == 0.0


# --------------------------------------------------------------------------------------- optimizer


def _tiny_params(config):
  model = models.build_model(config.model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))['params']


def test_weight_decay_mask_follows_the_official_regularisers():
  config = tiny_config()
  params = _tiny_params(config)
  mask = traverse_util.flatten_dict(optim.weight_decay_mask(params), sep='/')
  decayed = {k for k, v in mask.items() if v}
  assert 'logits/semantic/weights' in decayed
  assert 'logits/semantic/biases' not in decayed
  assert 'aspp0/weights' in decayed
  assert 'resnet_v1_50/conv1_1/weights' in decayed
  assert 'resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/weights' in decayed
  assert 'aspp1_pointwise/weights' in decayed
  assert 'aspp1_depthwise/depthwise_weights' not in decayed
  assert all(k.endswith('/weights') for k in decayed)
  assert not any(k.endswith(('gamma', 'beta', 'depthwise_weights', 'biases')) for k in decayed)
  # The decay gradient is wd * w on exactly those leaves.
  config.optim.weight_decay = 0.5
  config.optim.base_lr = 1.0
  config.optim.momentum = 0.0
  real = jax.tree.map(lambda s: np.ones(s.shape, np.float32), params)
  tx = optim.create_optimizer(config, real)
  zeros = jax.tree.map(np.zeros_like, real)
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(zeros, real)
  flat = traverse_util.flatten_dict(updates, sep='/')
  for k, v in flat.items():
    np.testing.assert_allclose(v, -0.5 if k in decayed else 0.0, err_msg=k)


def test_learning_rate_schedule_poly_and_warmup():
  o = config_lib.get_base_config().optim
  o.base_lr, o.end_lr, o.power = 0.01, 0.0, 0.9
  poly = optim.learning_rate_schedule(o, 100)
  for step in (0, 10, 50, 99, 100):
    np.testing.assert_allclose(poly(step), 0.01 * (1 - step / 100) ** 0.9, rtol=1e-5, atol=1e-9)
  o.warmup_steps, o.warmup_lr = 10, 0.001
  linear = optim.learning_rate_schedule(o, 100)
  np.testing.assert_allclose(linear(0), 0.001, rtol=1e-6)
  np.testing.assert_allclose(linear(5), 0.0055, rtol=1e-5)
  np.testing.assert_allclose(linear(20), poly(20), rtol=1e-6)
  o.warmup_mode = 'constant'
  slow_start = optim.learning_rate_schedule(o, 100)
  np.testing.assert_allclose(slow_start(9), 0.001, rtol=1e-6)
  np.testing.assert_allclose(slow_start(10), poly(10), rtol=1e-6)


def test_frozen_backbone_bn_keeps_statistics_and_affine():
  config = tiny_config()
  config.model.freeze_backbone_bn = True
  model = models.build_model(config.model)
  batch = next(fake_train_iterator(config, mean_pixel=None))
  variables = random_variables(config)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                           rngs={'dropout': jax.random.key(1)})[1])
  new_stats = traverse_util.flatten_dict(apply(variables, batch['image'])['batch_stats'], sep='/')
  old_stats = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  scope = models.backbone_scope(config.model.backbone)
  assert set(new_stats) == set(old_stats)
  for k, v in old_stats.items():
    same = np.array_equal(v, new_stats[k])
    assert same == k.startswith(scope), k  # Backbone statistics frozen, head statistics updated.
  # The optimizer holds the backbone's gamma/beta fixed too, and only those.
  params = variables['params']
  tx = optim.create_optimizer(config, params)
  grads = jax.tree.map(np.ones_like, params)
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  for k, v in traverse_util.flatten_dict(updates, sep='/').items():
    frozen = k.startswith(scope) and k.endswith(('BatchNorm/gamma', 'BatchNorm/beta'))
    assert bool(np.all(np.asarray(v) == 0)) == frozen, k


# ------------------------------------------------------------------------------------ main loop


def _run(config, workdir, **kwargs):
  return train.train_and_evaluate(config, workdir, create_train_iterator=fake_train_iterator,
                                  create_eval_iterator=fake_eval_iterator, **kwargs)


def _train_records(workdir):
  return {r['step']: r for r in metrics.read_metrics(workdir) if 'train/loss' in r}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One uninterrupted 6-step run with checkpoints at 3 and 6 and an evaluation at 6 (with
  trimap mIoU and charts, as the default config evaluates)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config()
  config.eval.trimap_widths, config.eval.plots = (1, 4), True
  state = _run(config, workdir)
  return workdir, jax.device_get(state.params)


def test_train_and_evaluate_end_to_end(trained):
  workdir, _ = trained
  assert checkpoint.available_steps(workdir) == [3, 6]
  with open(os.path.join(workdir, 'eval', 'validation_6.json')) as f:
    result = json.load(f)
  assert {'step', 'miou', 'per_class_iou', 'pixel_accuracy'} <= set(result)
  assert result['step'] == 6 and list(result['per_class_iou']) == list(FAKE_CLASSES)
  assert 0.0 <= result['miou'] <= 1.0 and 0.0 <= result['pixel_accuracy'] <= 1.0
  records = _train_records(workdir)
  assert sorted(records) == list(range(1, 7))
  for r in records.values():
    assert {'train/loss', 'train/learning_rate', 'train/grad_norm', 'train/pixel_accuracy'} <= set(r)
    assert np.isfinite(r['train/loss']) and r['train/grad_norm'] > 0
  base_lr = tiny_config().optim.base_lr
  for step, r in records.items():  # Poly schedule, logged for the update of that step.
    np.testing.assert_allclose(r['train/learning_rate'], base_lr * (1 - (step - 1) / 6) ** 0.9,
                               rtol=1e-5)
  assert records[6]['train/loss'] < records[1]['train/loss']
  evals = [r for r in metrics.read_metrics(workdir) if 'eval/miou' in r]
  assert [r['step'] for r in evals] == [6]
  np.testing.assert_allclose(evals[0]['eval/miou'], result['miou'], rtol=1e-6)
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  # Predictions for the first images, next to the JSON: input, ground truth and prediction PNGs.
  pngs = os.path.join(workdir, 'eval', 'validation_6')
  assert sorted(os.listdir(pngs)) == [f'{i}_{k}.png' for i in range(2)
                                      for k in ('ground_truth', 'input', 'prediction')]
  gt = np.asarray(Image.open(os.path.join(pngs, '0_ground_truth.png')))
  assert gt.shape == (*tiny_config().eval.crop_size, 3) and gt.dtype == np.uint8
  # Boundary mIoU per band width, and the charts beside the JSON.
  assert [t['width'] for t in result['trimap']] == [1, 4]
  for kind in ('per_class_iou', 'confusion', 'trimap'):
    assert os.path.isfile(os.path.join(workdir, 'eval', f'validation_6_{kind}.png')), kind


def test_eval_mode_from_checkpoint_equals_eval_at_end_of_training(trained):
  workdir, _ = trained
  with open(os.path.join(workdir, 'eval', 'validation_6.json')) as f:
    at_end = json.load(f)
  again = evaluate.evaluate_checkpoint(tiny_config(), workdir,
                                       create_eval_iterator=fake_eval_iterator)
  assert again['step'] == 6
  np.testing.assert_allclose(again['miou'], at_end['miou'], rtol=1e-6)
  np.testing.assert_allclose(again['pixel_accuracy'], at_end['pixel_accuracy'], rtol=1e-6)
  assert again['per_class_iou'] == pytest.approx(at_end['per_class_iou'], rel=1e-6)
  assert again['num_pixels'] == at_end['num_pixels'] > 0


def test_resume_reproduces_an_uninterrupted_run(trained, tmp_path):
  straight_dir, straight_params = trained
  workdir = str(tmp_path / 'resumed')
  first = _run(tiny_config(), workdir, run_eval=False, stop_at_step=3)
  assert int(first.step) == 3 and checkpoint.available_steps(workdir) == [3]
  second = _run(tiny_config(), workdir, run_eval=False)
  assert int(second.step) == 6
  a, b = _train_records(straight_dir), _train_records(workdir)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    for k in ('train/loss', 'train/grad_norm', 'train/learning_rate', 'train/pixel_accuracy'):
      np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-5, err_msg=f'{k} at {step}')
  flat_a = traverse_util.flatten_dict(straight_params, sep='/')
  flat_b = traverse_util.flatten_dict(jax.device_get(second.params), sep='/')
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    np.testing.assert_allclose(flat_b[k], flat_a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path):
  config = tiny_config()

  def poisoned(config, **kwargs):
    for i, batch in enumerate(fake_train_iterator(config, **kwargs)):
      if kwargs.get('start_step', 0) + i == 4:  # The batch of step 5.
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='step 5') as error:
    train.train_and_evaluate(config, workdir, run_eval=False, create_train_iterator=poisoned)
  assert 'last good checkpoint is step 3' in str(error.value)
  assert checkpoint.available_steps(workdir) == [3]
  assert not np.isfinite(_train_records(workdir)[5]['train/loss'])
