"""Fixed-order cross-device sums (`deeplab_jax.reductions`) on the 4 forced CPU devices.

The reference for every value and gradient is the same computation on the whole batch on one
device, with plain sums (no mesh axis): BatchNorm over the batch, the loss over the batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deeplab_jax import losses, reductions, sharding
from deeplab_jax.models import layers

AXIS = sharding.DATA_AXIS


def _per_device(fn, *args):
  """`fn` inside shard_map on the 4 devices; each device's result stacked along a new axis 0."""
  mesh = sharding.create_mesh()
  mapped = jax.shard_map(lambda *a: jax.tree.map(lambda y: y[None], fn(*a)), mesh=mesh,
                         in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)
  return jax.device_get(jax.jit(mapped)(*args))


@pytest.mark.parametrize('size', [1, 5, 12, 37])
def test_ordered_psum_is_the_sum_and_the_same_bits_on_every_device(size):
  assert jax.device_count() == 4  # conftest forces 4 CPU devices.
  rng = np.random.default_rng(size)
  tree = {'a': rng.normal(size=(4, size)).astype(np.float32),
          'b': rng.normal(size=(4, size, 3)).astype(np.float32)}
  out = _per_device(lambda t: reductions.ordered_psum(jax.tree.map(lambda x: x[0], t), AXIS), tree)
  for key, x in tree.items():
    assert out[key].shape == (4, *x.shape[1:]) and out[key].dtype == np.float32
    np.testing.assert_allclose(out[key][0], x.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)
    for device in range(1, 4):
      np.testing.assert_array_equal(out[key][device], out[key][0])


def test_gather_rows_stacks_the_devices_in_order():
  x = np.arange(4 * 2 * 3, dtype=np.float32).reshape(8, 3)
  out = _per_device(lambda rows: reductions.gather_rows(rows, AXIS), x)
  for device in range(4):
    np.testing.assert_array_equal(out[device], x)


class _Net(nn.Module):
  """conv -> BatchNorm (training statistics) -> ReLU -> 1x1 logits: BatchNorm couples the rows."""

  axis_name: str | None

  @nn.compact
  def __call__(self, x):
    x = layers.ConvBN(6, 3, bn=layers.BatchNormConfig(decay=0.5, axis_name=self.axis_name),
                      name='conv')(x, train=True)
    return layers.ConvBN(3, 1, use_bn=False, activation=None, use_bias=True, name='logits')(x)


@pytest.mark.parametrize('top_k', [1.0, 0.25])
def test_sharded_loss_and_gradient_shares_add_up_to_the_global_ones(top_k):
  """Per-device loss, gradient shares summed by `ordered_psum` and BatchNorm statistics equal the
  one-device computation on the whole batch (hard-pixel mining's global top-k included)."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 7, 7, 2)).astype(np.float32)
  labels = rng.integers(0, 3, size=(8, 7, 7)).astype(np.int32)
  labels[:, 0] = 255
  variables = _Net(None).init(jax.random.key(0), images[:1])

  def step(axis_name, images, labels):
    def loss_fn(params):
      logits, updated = _Net(axis_name).apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images,
          mutable=['batch_stats'])
      loss = losses.segmentation_loss(logits, labels, top_k_percent_pixels=top_k,
                                      axis_name=axis_name)
      return loss, updated['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    if axis_name is not None:
      grads = reductions.ordered_psum(grads, axis_name)
    return loss, grads, stats

  want = jax.device_get(jax.jit(lambda i, lb: step(None, i, lb))(images, labels))
  got = _per_device(lambda i, lb: step(AXIS, i, lb), images, labels)
  for device in range(4):
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_allclose(g[device], w, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(g[device], g[0])  # Replicated: the same bits everywhere.
  assert float(np.abs(jax.tree.leaves(want[1])[0]).max()) > 1e-3  # Real, non-zero gradients.
