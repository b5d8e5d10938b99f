"""BatchNorm folded into the preceding conv (inference): outputs and gradients equal to the plain
conv -> BatchNorm, per layer and for whole models, and an error when used for training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakes import random_variables, tiny_config

from deeplab_jax import models
from deeplab_jax.models import layers

BN = layers.BatchNormConfig(epsilon=1e-3)
FOLDED = layers.BatchNormConfig(epsilon=1e-3, folded=True)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # Relative to the output's largest magnitude.


def random_bn(variables: dict, seed: int) -> dict:
  """`variables` with random BatchNorm parameters and moving statistics (init's are identities)."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'BatchNorm' not in name:
      return leaf
    if 'gamma' in name or 'moving_variance' in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(value, variables)


def close(a: jax.Array, b: jax.Array, tol: float) -> None:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, atol=tol * np.abs(a).max(), rtol=0)


def layer_pair(kind: str, stride: int, rate: int, dtype) -> tuple:
  # No activation: in bfloat16 a ReLU whose input is near 0 passes the gradient in one formulation
  # and not in the other, which says nothing about the fold.
  common = dict(stride=stride, rate=rate, dtype=dtype, activation=None)
  if kind == 'depthwise':
    return (layers.DepthwiseConvBN(bn=BN, impl='shift', **common),
            layers.DepthwiseConvBN(bn=FOLDED, impl='shift', **common))
  k = 1 if kind == 'pointwise' else 3
  return layers.ConvBN(8, k, bn=BN, **common), layers.ConvBN(8, k, bn=FOLDED, **common)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('kind,stride,rate', [
    ('depthwise', 1, 1), ('depthwise', 2, 1), ('depthwise', 1, 2), ('depthwise', 1, 3),
    ('depthwise', 1, 4), ('pointwise', 1, 1), ('pointwise', 2, 1), ('conv3x3', 2, 1),
    ('conv3x3', 1, 4)])
def test_layer_outputs_and_gradients(kind, stride, rate, dtype):
  plain, folded = layer_pair(kind, stride, rate, dtype)
  x = jax.random.normal(jax.random.key(1), (2, 13, 11, 6), jnp.float32).astype(dtype)
  variables = random_bn(plain.init(jax.random.key(0), x), seed=stride * 10 + rate)
  assert jax.tree.structure(folded.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  weights = jax.random.normal(jax.random.key(2), plain.apply(variables, x).shape)

  def loss(module, v, x):
    return jnp.sum(module.apply(v, x).astype(jnp.float32) * weights)

  close(plain.apply(variables, x), folded.apply(variables, x), TOL[dtype])
  g_plain = jax.grad(lambda v, x: loss(plain, v, x), (0, 1))(variables, x)
  g_folded = jax.grad(lambda v, x: loss(folded, v, x), (0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_folded), strict=True):
    close(a, b, 4 * TOL[dtype])  # Kernel, BatchNorm parameters and moving statistics, input.


@pytest.mark.parametrize('backbone', ['xception_41', 'resnet_v1_50_beta'])  # Depthwise; 3x3 convs.
def test_whole_model_logits(backbone):
  config = tiny_config()
  config.model.backbone = backbone
  variables = random_variables(config, seed=3)
  images = jax.random.uniform(jax.random.key(0), (1, 49, 49, 3), jnp.float32, 0, 255)
  plain = models.build_model(config.model)
  folded = models.build_model(config.model, fold_batch_norm=True)
  expected = plain.apply(variables, images, train=False)
  close(expected, jax.jit(lambda v, x: folded.apply(v, x, train=False))(variables, images), 1e-5)


def test_training_a_folded_batch_norm_is_an_error():
  _, folded = layer_pair('pointwise', 1, 1, jnp.float32)
  x = jnp.ones((1, 5, 5, 4))
  variables = folded.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='inference'):
    folded.apply(variables, x, train=True, mutable=['batch_stats'])
