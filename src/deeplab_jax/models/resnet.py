"""ResNet-v1-50/101, plain (7x7 stem) and `beta` (three 3x3 stem convs), as DeepLab's TF-slim code.

TF-slim ResNet v1 puts a block's stride in its *last* unit (on the 3x3 conv), and the official DeepLab
block4 has stride 1 with multi-grid unit rates, so the plain backbone has output stride 32. Both
variants live under the TF scope `resnet_v1_{50,101}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers

ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    'resnet_v1_50': (3, 4, 6, 3),
    'resnet_v1_101': (3, 4, 23, 3),
}
BASE_DEPTHS = (64, 128, 256, 512)
BLOCK_STRIDES = (2, 2, 2, 1)
ROOT_STRIDE = 4
BATCH_NORM = layers.BatchNormConfig(decay=0.95, epsilon=1e-5)


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
    conv = lambda *a, **k: layers.Conv2D(*a, bn=self.bn, dtype=self.dtype, **k)  # noqa: E731
    if inputs.shape[-1] == self.depth:
      shortcut = inputs[:, ::self.stride, ::self.stride, :]
    else:
      shortcut = conv(self.depth, 1, stride=self.stride, relu=False, name='shortcut')(inputs, train)
    x = conv(self.depth_bottleneck, 1, name='conv1')(inputs, train)
    x = conv(self.depth_bottleneck, 3, stride=self.stride, rate=self.rate, name='conv2')(x, train)
    x = conv(self.depth, 1, relu=False, name='conv3')(x, train)
    return nn.relu(shortcut.astype(x.dtype) + x), x


class _Unit(nn.Module):
  """The `unit_N` scope, holding one `bottleneck_v1`."""

  module: dict  # Bottleneck fields.
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    return cls(**self.module, name='bottleneck_v1')(x, train)


class _Block(nn.Module):
  """The `blockN` scope: its units in order. Returns every unit's (output, conv3 output)."""

  units: tuple[dict, ...]
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[tuple[jax.Array, jax.Array]]:
    outputs = []
    for i, unit in enumerate(self.units):
      x, conv3 = _Unit(unit, self.remat, name=f'unit_{i + 1}')(x, train)
      outputs.append((x, conv3))
    return outputs


class ResNet(nn.Module):
  """ResNet-v1 backbone for DeepLab. Returns {stride: feature}; key 4 is the decoder's end point.

  `features[output_stride]` is the backbone output; `features[4]` is `block1/unit_2/bottleneck_v1/
  conv3` (BatchNorm output before the residual sum), the feature the official decoder takes.
  """

  architecture: str = 'resnet_v1_101_beta'
  output_stride: int = 16
  multi_grid: tuple[int, int, int] = (1, 2, 4)
  width_multiplier: float = 1.0
  bn: layers.BatchNormConfig = BATCH_NORM
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[int, jax.Array]:
    num_units = ARCHITECTURES[scope_name(self.architecture)]
    width = lambda d: layers.scaled_depth(d, self.width_multiplier)  # noqa: E731
    conv = lambda *a, **k: layers.Conv2D(*a, bn=self.bn, dtype=self.dtype, **k)  # noqa: E731
    if self.architecture.endswith('_beta'):
      x = conv(width(64), 3, stride=2, name='conv1_1')(x, train)
      x = conv(width(64), 3, name='conv1_2')(x, train)
      x = conv(width(128), 3, name='conv1_3')(x, train)
    else:
      x = conv(width(64), 7, stride=2, name='conv1')(x, train)
    features = {2: x}
    x = layers.max_pool_same(x, 3, 2)
    features[4] = x

    unit_strides = [[1] * (n - 1) + [s] for n, s in zip(num_units, BLOCK_STRIDES, strict=True)]
    plan = layers.atrous_plan(unit_strides, self.output_stride, ROOT_STRIDE)
    stride = ROOT_STRIDE
    for b, block_plan in enumerate(plan):
      units = []
      for u, (unit_stride, rate) in enumerate(block_plan):
        unit_rate = self.multi_grid[u] if b == 3 else 1
        units.append(dict(depth=width(BASE_DEPTHS[b] * 4), depth_bottleneck=width(BASE_DEPTHS[b]),
                          stride=unit_stride, rate=rate * unit_rate, bn=self.bn, dtype=self.dtype))
      outputs = _Block(tuple(units), self.remat, name=f'block{b + 1}')(x, train)
      for (out, _conv3), (unit_stride, _) in zip(outputs, block_plan, strict=True):
        stride *= unit_stride
        features[stride] = out
      x = outputs[-1][0]
      if b == 0:
        decoder_feature = outputs[1][1]
    features[4] = decoder_feature
    return features
