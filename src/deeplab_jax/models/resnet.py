"""ResNet-v1-50/101, plain (7x7 stem) and `beta` (three 3x3 stem convs), as DeepLab's TF-slim code.

TF-slim ResNet v1 puts a block's stride in its *last* unit (on the 3x3 conv), and the official DeepLab
block4 has stride 1 with multi-grid unit rates, so the plain backbone has output stride 32. Both
variants live under the TF scope `resnet_v1_{50,101}`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers, scopes

ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    'resnet_v1_50': (3, 4, 6, 3),
    'resnet_v1_101': (3, 4, 23, 3),
}
BASE_DEPTHS = (64, 128, 256, 512)
BLOCK_STRIDES = (2, 2, 2, 1)
ROOT_STRIDE = 4
BATCH_NORM = layers.BatchNormConfig(decay=0.95, epsilon=1e-5)
DEFAULT_MULTI_GRID = (1, 2, 4)


def scope_name(backbone: str) -> str:
  """TF scope of a backbone: `resnet_v1_101_beta` lives under `resnet_v1_101`."""
  return backbone.removesuffix('_beta')


class Bottleneck(nn.Module):
  """`bottleneck_v1`: 1x1 -> 3x3 (stride, rate) -> 1x1, plus a projection or identity shortcut.

  Returns the output and conv3's BatchNorm output before the residual sum (the decoder end point).
  """

  depth: int
  depth_bottleneck: int
  stride: int
  rate: int
  bn: layers.BatchNormConfig
  dtype: Any

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    conv = functools.partial(layers.ConvBN, bn=self.bn, dtype=self.dtype)
    if inputs.shape[-1] == self.depth:
      shortcut = inputs[:, ::self.stride, ::self.stride, :]
    else:
      shortcut = conv(self.depth, 1, stride=self.stride, activation=None,
                      name='shortcut')(inputs, train)
    x = conv(self.depth_bottleneck, 1, name='conv1')(inputs, train)
    x = conv(self.depth_bottleneck, 3, stride=self.stride, rate=self.rate, name='conv2')(x, train)
    x = conv(self.depth, 1, activation=None, name='conv3')(x, train)
    return nn.relu(shortcut.astype(x.dtype) + x), x


class ResNet(nn.Module):
  """ResNet-v1 backbone for DeepLab; returns `scopes.Features`.

  The decoder's end point is `block1/unit_2/bottleneck_v1/conv3` (BatchNorm output before the
  residual sum, in the unit before block1's strided one), as in the official code.
  """

  architecture: str = 'resnet_v1_101_beta'
  output_stride: int = 16
  multi_grid: tuple[int, int, int] = DEFAULT_MULTI_GRID
  width_multiplier: float = 1.0
  bn: layers.BatchNormConfig = BATCH_NORM
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> scopes.Features:
    num_units = ARCHITECTURES[scope_name(self.architecture)]
    width = functools.partial(layers.scaled_depth, multiplier=self.width_multiplier)
    conv = functools.partial(layers.ConvBN, bn=self.bn, dtype=self.dtype)
    if self.architecture.endswith('_beta'):
      x = conv(width(64), 3, stride=2, name='conv1_1')(x, train)
      x = conv(width(64), 3, name='conv1_2')(x, train)
      x = conv(width(128), 3, name='conv1_3')(x, train)
    else:
      x = conv(width(64), 7, stride=2, name='conv1')(x, train)
    by_stride = {2: x}
    x = layers.max_pool_same(x, 3, 2)

    unit_strides = [[1] * (n - 1) + [s] for n, s in zip(num_units, BLOCK_STRIDES, strict=True)]
    plan = layers.atrous_plan(unit_strides, self.output_stride, ROOT_STRIDE)
    stride = ROOT_STRIDE
    for b, block_plan in enumerate(plan):
      units = []
      for u, (unit_stride, rate) in enumerate(block_plan):
        unit_rate = self.multi_grid[u] if b == 3 else 1
        units.append(dict(depth=width(BASE_DEPTHS[b] * 4), depth_bottleneck=width(BASE_DEPTHS[b]),
                          stride=unit_stride, rate=rate * unit_rate, bn=self.bn, dtype=self.dtype))
      outputs = scopes.Block(Bottleneck, 'bottleneck_v1', tuple(units), self.remat,
                             name=f'block{b + 1}')(x, train)
      for (out, _conv3), (unit_stride, _) in zip(outputs, block_plan, strict=True):
        stride *= unit_stride
        by_stride[stride] = out
      x = outputs[-1][0]
      if b == 0:  # conv3 of the unit before block1's strided last unit.
        decoder = outputs[-2][1]
    return scopes.Features(by_stride, decoder)
